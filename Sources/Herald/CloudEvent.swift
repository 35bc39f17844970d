/// A CloudEvents 1.0 envelope: the attributes every Herald event travels with, and its data.
///
/// All attributes and the data live in one copy-on-write box, so passing an envelope around costs one reference
/// count and mutating a shared one copies it first.
/// The known extensions (`recipient`, `correlationid`, `causationid`, `partitionkey`, `traceparent`,
/// `tracestate`) have typed properties; any other extension is in `extensions`.
public struct CloudEvent: Sendable {
    /// The CloudEvents spec version Herald speaks.
    public static let specVersion = "1.0"

    /// Every attribute lives in one copy-on-write box, so copying an envelope (into a queue, a context, a
    /// delivery) costs one reference count, whatever it carries.
    @usableFromInline
    var storage: Storage

    /// An envelope with the required attributes; `time` defaults to now.
    public init(
        id: EventID = EventID(),
        source: String,
        type: String,
        time: Timestamp? = .now(),
        data: EventData = .none
    ) {
        storage = Storage(id: id, source: source, type: type, time: time, data: data)
    }

    /// An envelope for a typed event with a new id, the time now, and the event's own subject and partition key.
    @inlinable
    public init<E: Event>(_ event: E, source: String) {
        storage = TypedStorage(id: EventID(), source: source, type: E.eventType, time: .coarseNow(), value: event)
        if let subject = event.subject { storage.subject = subject }
        if let key = event.partitionKey { storage.partitionkey = key }
    }

    /// An envelope for a typed event.
    public init<E: Event>(_ event: E, source: String, attributes: EventAttributes) {
        storage = TypedStorage(
            id: attributes.id ?? EventID(), source: source, type: E.eventType, time: attributes.time ?? .coarseNow(),
            value: event)
        storage.subject = attributes.subject ?? event.subject
        storage.partitionkey = attributes.partitionKey ?? event.partitionKey
        if attributes.recipient != nil || attributes.correlationID != nil || attributes.causationID != nil
            || !attributes.extensions.isEmpty
        {
            let extras = Extras()
            extras.recipient = attributes.recipient
            extras.correlationid = attributes.correlationID
            extras.causationid = attributes.causationID
            extras.extensions = attributes.extensions
            storage.extras = extras
        }
    }

    @inlinable
    mutating func mutate(_ body: (Storage) -> Void) {
        if !isKnownUniquelyReferenced(&storage) { storage = storage.copy() }
        body(storage)
    }

    @inlinable
    mutating func mutateExtras(_ body: (Extras) -> Void) {
        mutate { storage in
            if storage.extras == nil { storage.extras = Extras() }
            body(storage.extras!)
        }
    }

    public var id: EventID {
        get { storage.id }
        set { mutate { $0.id = newValue } }
    }
    /// The producer (a URI-reference), for example the service name.
    public var source: String {
        get { storage.source }
        set { mutate { $0.source = newValue } }
    }
    /// The stable event type name, for example `com.example.order.created`.
    public var type: String {
        get { storage.type }
        set { mutate { $0.type = newValue } }
    }
    public var specversion: String {
        get { storage.specversion }
        set { mutate { $0.specversion = newValue } }
    }
    public var time: Timestamp? {
        get { storage.time }
        set { mutate { $0.time = newValue } }
    }
    public var data: EventData {
        get { storage.data }
        set {
            // A typed box cannot hold other data: replace it with a plain one.
            if storage is any TypedStorageMarker {
                storage = storage.copy()
            }
            mutate { $0.data = newValue }
        }
    }
    public var subject: String? {
        get { storage.subject }
        set { mutate { $0.subject = newValue } }
    }
    public var datacontenttype: String? {
        get { storage.extras?.datacontenttype }
        set { mutateExtras { $0.datacontenttype = newValue } }
    }
    public var dataschema: String? {
        get { storage.extras?.dataschema }
        set { mutateExtras { $0.dataschema = newValue } }
    }
    /// The service this event is addressed to; nil for a broadcast.
    public var recipient: String? {
        get { storage.extras?.recipient }
        set { mutateExtras { $0.recipient = newValue } }
    }
    /// The conversation (for example one order's life) this event belongs to.
    public var correlationid: String? {
        get { storage.extras?.correlationid }
        set { mutateExtras { $0.correlationid = newValue } }
    }
    /// The id of the event whose handling produced this one.
    public var causationid: String? {
        get { storage.extras?.causationid }
        set { mutateExtras { $0.causationid = newValue } }
    }
    /// The key that orders events (per-key order) and picks their partition.
    public var partitionkey: String? {
        get { storage.partitionkey }
        set { mutate { $0.partitionkey = newValue } }
    }
    /// W3C trace context.
    public var traceparent: String? {
        get { storage.extras?.traceparent }
        set { mutateExtras { $0.traceparent = newValue } }
    }
    public var tracestate: String? {
        get { storage.extras?.tracestate }
        set { mutateExtras { $0.tracestate = newValue } }
    }
    /// Extensions other than the known ones. Names must be lowercase `[a-z0-9]`; `validate()` checks them.
    public var extensions: [String: ExtensionValue] {
        get { storage.extras?.extensions ?? [:] }
        set { mutateExtras { $0.extensions = newValue } }
    }

    /// The names of the context attributes that are CloudEvents extensions Herald knows by name.
    public static let knownExtensions: Set<String> = [
        "recipient", "correlationid", "causationid", "partitionkey", "traceparent", "tracestate",
    ]

    /// Reads any extension, known or free-form, by its name.
    public subscript(extension name: String) -> ExtensionValue? {
        switch name {
        case "recipient": return recipient.map(ExtensionValue.string)
        case "correlationid": return correlationid.map(ExtensionValue.string)
        case "causationid": return causationid.map(ExtensionValue.string)
        case "partitionkey": return partitionkey.map(ExtensionValue.string)
        case "traceparent": return traceparent.map(ExtensionValue.string)
        case "tracestate": return tracestate.map(ExtensionValue.string)
        default: return storage.extras?.extensions[name]
        }
    }

    /// Sets any extension by name after checking the name (and, for known extensions, the value's type).
    public mutating func setExtension(_ name: String, _ value: ExtensionValue?) throws(CloudEventError) {
        try CloudEvent.validateExtensionName(name)
        if CloudEvent.knownExtensions.contains(name) {
            var text: String?
            if let value {
                guard case .string(let string) = value else {
                    throw CloudEventError(
                        .invalidAttributeType, attribute: name, "extension '\(name)' must be a string")
                }
                text = string
            }
            switch name {
            case "recipient": recipient = text
            case "correlationid": correlationid = text
            case "causationid": causationid = text
            case "partitionkey": partitionkey = text
            case "traceparent": traceparent = text
            default: tracestate = text
            }
        } else {
            extensions[name] = value
        }
    }

    /// Every extension, known and free-form, with its value.
    public var allExtensions: [(name: String, value: ExtensionValue)] {
        var result: [(String, ExtensionValue)] = []
        if let recipient { result.append(("recipient", .string(recipient))) }
        if let correlationid { result.append(("correlationid", .string(correlationid))) }
        if let causationid { result.append(("causationid", .string(causationid))) }
        if let partitionkey { result.append(("partitionkey", .string(partitionkey))) }
        if let traceparent { result.append(("traceparent", .string(traceparent))) }
        if let tracestate { result.append(("tracestate", .string(tracestate))) }
        for name in extensions.keys.sorted() { result.append((name, extensions[name]!)) }
        return result
    }

    /// Checks the required attributes and every extension name; throws the first problem found.
    public func validate() throws(CloudEventError) {
        if id.description.isEmpty { throw CloudEventError(.missingAttribute, attribute: "id", "'id' is empty") }
        if source.isEmpty { throw CloudEventError(.missingAttribute, attribute: "source", "'source' is empty") }
        if type.isEmpty { throw CloudEventError(.missingAttribute, attribute: "type", "'type' is empty") }
        if specversion != CloudEvent.specVersion {
            throw CloudEventError(
                .unsupportedSpecVersion, attribute: "specversion",
                "'specversion' is '\(specversion)'; only '1.0' is supported")
        }
        for name in extensions.keys { try CloudEvent.validateExtensionName(name) }
    }

    /// Checks a CloudEvents attribute name: lowercase ASCII letters and digits only, not empty.
    public static func validateExtensionName(_ name: String) throws(CloudEventError) {
        let valid =
            !name.isEmpty
            && name.utf8.allSatisfy { ($0 >= UInt8(ascii: "a") && $0 <= UInt8(ascii: "z")) || ($0 >= 48 && $0 <= 57) }
        if !valid {
            throw CloudEventError(
                .invalidExtensionName, attribute: name,
                "extension name '\(name)' is invalid: use lowercase letters a-z and digits 0-9 only")
        }
        if reservedNames.contains(name) {
            throw CloudEventError(
                .invalidExtensionName, attribute: name, "'\(name)' is a CloudEvents core attribute, not an extension")
        }
    }

    static let reservedNames: Set<String> = [
        "id", "source", "type", "specversion", "time", "subject", "datacontenttype", "dataschema", "data",
        "data_base64",
    ]
}

extension CloudEvent {
    /// The typed value, when this envelope carries one of type `E` (no cast through an existential).
    @inlinable
    public func typedValue<E: Event>(as type: E.Type) -> E? {
        (storage as? TypedStorage<E>)?.value
    }

    @usableFromInline
    class Storage: @unchecked Sendable {
        // Safe: only mutated through `CloudEvent.mutate`, which copies unless uniquely referenced, so an instance
        // shared between envelopes (and so possibly between threads) is never written to.
        @usableFromInline var id: EventID
        @usableFromInline var source: String
        @usableFromInline var type: String
        @usableFromInline var specversion: String
        @usableFromInline var time: Timestamp?
        @usableFromInline var plainData: EventData
        @usableFromInline var data: EventData {
            get { plainData }
            set { plainData = newValue }
        }
        @usableFromInline var subject: String?
        @usableFromInline var partitionkey: String?
        /// Attributes most events do not set, allocated only when one is.
        @usableFromInline var extras: Extras?

        @usableFromInline
        init(id: EventID, source: String, type: String, time: Timestamp?, data: EventData) {
            self.id = id
            self.source = source
            self.type = type
            self.specversion = CloudEvent.specVersion
            self.time = time
            self.plainData = data
        }

        /// A plain (untyped) copy; a typed value is boxed as `EventData.value` here.
        @usableFromInline
        func copy() -> Storage {
            let other = Storage(id: id, source: source, type: type, time: time, data: data)
            other.specversion = specversion
            other.subject = subject
            other.partitionkey = partitionkey
            other.extras = extras?.copy()
            return other
        }
    }

    /// Storage that keeps a typed event value inline, so publishing in process allocates one object per event and
    /// typed handlers read the value with a class check instead of an existential cast.
    @usableFromInline
    final class TypedStorage<E: Event>: Storage, TypedStorageMarker, @unchecked Sendable {
        // Safe for the same reason as `Storage`; `value` is never written after init.
        @usableFromInline let value: E

        @usableFromInline
        init(id: EventID, source: String, type: String, time: Timestamp?, value: E) {
            self.value = value
            super.init(id: id, source: source, type: type, time: time, data: .none)
        }

        @usableFromInline
        override var data: EventData {
            get { .value(value) }
            set { preconditionFailure("typed storage is replaced before its data is set") }
        }
    }

    @usableFromInline
    final class Extras: @unchecked Sendable {
        // Safe for the same reason as `Storage`: written only while uniquely referenced.
        @usableFromInline var datacontenttype: String?
        @usableFromInline var dataschema: String?
        @usableFromInline var recipient: String?
        @usableFromInline var correlationid: String?
        @usableFromInline var causationid: String?
        @usableFromInline var traceparent: String?
        @usableFromInline var tracestate: String?
        @usableFromInline var extensions: [String: ExtensionValue] = [:]

        @usableFromInline
        init() {}

        @usableFromInline
        func copy() -> Extras {
            let other = Extras()
            other.datacontenttype = datacontenttype
            other.dataschema = dataschema
            other.recipient = recipient
            other.correlationid = correlationid
            other.causationid = causationid
            other.traceparent = traceparent
            other.tracestate = tracestate
            other.extensions = extensions
            return other
        }
    }
}

/// Marks typed storage (whatever its type parameter) so setting `data` knows to replace it.
@usableFromInline
protocol TypedStorageMarker: AnyObject {}

/// The value of a CloudEvents extension attribute (the JSON-representable CloudEvents types).
public enum ExtensionValue: Sendable, Hashable, CustomStringConvertible {
    case string(String)
    case integer(Int32)
    case boolean(Bool)

    public var description: String {
        switch self {
        case .string(let value): return value
        case .integer(let value): return String(value)
        case .boolean(let value): return value ? "true" : "false"
        }
    }
}

/// The data of an event.
public enum EventData: Sendable {
    /// No data.
    case none
    /// Encoded bytes, described by `datacontenttype` (JSON when absent).
    case bytes([UInt8])
    /// A typed event, encoded to JSON only when it leaves the process.
    case value(any Event)

    /// The data as bytes: typed values are encoded as JSON.
    public func encoded() throws(CloudEventError) -> [UInt8]? {
        switch self {
        case .none: return nil
        case .bytes(let bytes): return bytes
        case .value(let value):
            do {
                return try EventCoding.encode(value)
            } catch {
                throw CloudEventError(.invalidData, attribute: "data", "data could not be encoded: \(error)")
            }
        }
    }
}
