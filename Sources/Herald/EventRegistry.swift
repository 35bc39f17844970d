import Synchronization

/// Maps stable type names to Swift event types, so an incoming CloudEvent decodes into the right type.
/// An event whose type is not registered stays available as its raw envelope.
public final class EventRegistry: Sendable {
    struct Entry: Sendable {
        let swiftType: ObjectIdentifier
        let swiftTypeName: String
        let decode: @Sendable ([UInt8]) throws -> any Event
    }

    private let entries = Mutex<[String: Entry]>([:])

    public init() {}

    /// Registers an event type under its `eventType`. Registering the same Swift type twice is harmless; a
    /// different Swift type under a name already taken is a programming error reported by the thrown error.
    public func register<E: Event>(_ type: E.Type) throws(RegistryError) {
        let entry = Entry(swiftType: ObjectIdentifier(type), swiftTypeName: String(reflecting: type)) { bytes in
            try EventCoding.decode(E.self, from: bytes)
        }
        try entries.withLock { (entries: inout [String: Entry]) throws(RegistryError) in
            if let existing = entries[E.eventType], existing.swiftType != entry.swiftType {
                throw RegistryError(
                    typeName: E.eventType, registered: existing.swiftTypeName, attempted: entry.swiftTypeName)
            }
            entries[E.eventType] = entry
        }
    }

    /// The registered type names.
    public var typeNames: [String] { entries.withLock { Array($0.keys).sorted() } }

    /// Decodes an envelope's data into its registered Swift type.
    /// - Returns: `.known` with the typed value, or `.unknown` when no type is registered for its name.
    /// - Throws: `CloudEventError` (`invalidData`) when the type is known but the data does not decode.
    public func decode(_ event: CloudEvent) throws(CloudEventError) -> DecodedEvent {
        if case .value(let value) = event.data { return .known(value, event) }
        guard let entry = entries.withLock({ $0[event.type] }) else { return .unknown(event) }
        guard case .bytes(let bytes) = event.data else {
            throw CloudEventError(.invalidData, attribute: "data", "event type '\(event.type)' requires data")
        }
        guard CloudEventJSON.isJSON(event.datacontenttype) else {
            throw CloudEventError(
                .invalidData, attribute: "datacontenttype",
                "event type '\(event.type)' is JSON, but datacontenttype is '\(event.datacontenttype ?? "")'")
        }
        do {
            let value = try entry.decode(bytes)
            var typed = event
            typed.data = .value(value)
            return .known(value, typed)
        } catch {
            throw CloudEventError(
                .invalidData, attribute: "data",
                "data of '\(event.type)' does not decode as \(entry.swiftTypeName): \(error)")
        }
    }
}

/// The outcome of decoding an envelope through an `EventRegistry`.
public enum DecodedEvent: Sendable {
    /// A registered type: the typed value, and the envelope carrying it.
    case known(any Event, CloudEvent)
    /// No type registered under the name: the raw envelope.
    case unknown(CloudEvent)

    public var envelope: CloudEvent {
        switch self {
        case .known(_, let envelope), .unknown(let envelope): return envelope
        }
    }
}

/// Two Swift types were registered under one event type name.
public struct RegistryError: Error, Hashable, Sendable, CustomStringConvertible {
    public let typeName: String
    public let registered: String
    public let attempted: String
    public var description: String {
        "event type '\(typeName)' is already registered to \(registered); cannot register \(attempted)"
    }
}
