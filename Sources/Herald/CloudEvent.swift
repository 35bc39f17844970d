/// A CloudEvents 1.0 envelope: the attributes every Herald event travels with, and its data.
///
/// Required attributes (`id`, `source`, `type`, `specversion`) are stored inline; the optional ones live in a
/// copy-on-write box that is only allocated when one is set, so publishing in process stays allocation-light.
/// The known extensions (`recipient`, `correlationid`, `causationid`, `partitionkey`, `traceparent`,
/// `tracestate`) have typed properties; any other extension is in `extensions`.
public struct CloudEvent: Sendable {
    /// The CloudEvents spec version Herald speaks.
    public static let specVersion = "1.0"

    public var id: EventID
    /// The producer (a URI-reference), for example the service name.
    public var source: String
    /// The stable event type name, for example `com.example.order.created`.
    public var type: String
    public var specversion: String
    public var time: Timestamp?
    public var data: EventData
    @usableFromInline
    var optional: OptionalAttributes?

    /// An envelope with the required attributes; `time` defaults to now.
    public init(
        id: EventID = EventID(),
        source: String,
        type: String,
        time: Timestamp? = .now(),
        data: EventData = .none
    ) {
        self.id = id
        self.source = source
        self.type = type
        self.specversion = CloudEvent.specVersion
        self.time = time
        self.data = data
        self.optional = nil
    }

    /// An envelope for a typed event.
    public init<E: Event>(_ event: E, source: String, attributes: EventAttributes = EventAttributes()) {
        self.init(
            id: attributes.id ?? EventID(),
            source: source,
            type: E.eventType,
            time: attributes.time ?? .coarseNow(),
            data: .value(event)
        )
        if let subject = attributes.subject ?? event.subject { self.subject = subject }
        if let key = attributes.partitionKey ?? event.partitionKey { self.partitionkey = key }
        if let recipient = attributes.recipient { self.recipient = recipient }
        if let correlation = attributes.correlationID { self.correlationid = correlation }
        if let causation = attributes.causationID { self.causationid = causation }
        for (name, value) in attributes.extensions { self.extensions[name] = value }
    }

    // MARK: Optional attributes

    public var subject: String? {
        get { optional?.subject }
        set { mutateOptional { $0.subject = newValue } }
    }
    public var datacontenttype: String? {
        get { optional?.datacontenttype }
        set { mutateOptional { $0.datacontenttype = newValue } }
    }
    public var dataschema: String? {
        get { optional?.dataschema }
        set { mutateOptional { $0.dataschema = newValue } }
    }
    /// The service this event is addressed to; nil for a broadcast.
    public var recipient: String? {
        get { optional?.recipient }
        set { mutateOptional { $0.recipient = newValue } }
    }
    /// The conversation (for example one order's life) this event belongs to.
    public var correlationid: String? {
        get { optional?.correlationid }
        set { mutateOptional { $0.correlationid = newValue } }
    }
    /// The id of the event whose handling produced this one.
    public var causationid: String? {
        get { optional?.causationid }
        set { mutateOptional { $0.causationid = newValue } }
    }
    /// The key that orders events (per-key order) and picks their partition.
    public var partitionkey: String? {
        get { optional?.partitionkey }
        set { mutateOptional { $0.partitionkey = newValue } }
    }
    /// W3C trace context.
    public var traceparent: String? {
        get { optional?.traceparent }
        set { mutateOptional { $0.traceparent = newValue } }
    }
    public var tracestate: String? {
        get { optional?.tracestate }
        set { mutateOptional { $0.tracestate = newValue } }
    }
    /// Extensions other than the known ones. Names must be lowercase `[a-z0-9]`, at most 20 characters
    /// recommended; `validate()` checks them.
    public var extensions: [String: ExtensionValue] {
        get { optional?.extensions ?? [:] }
        set { mutateOptional { $0.extensions = newValue } }
    }

    @inlinable
    mutating func mutateOptional(_ body: (OptionalAttributes) -> Void) {
        if optional == nil {
            optional = OptionalAttributes()
        } else if !isKnownUniquelyReferenced(&optional!) {
            optional = optional!.copy()
        }
        body(optional!)
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
        default: return optional?.extensions[name]
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
        if description(of: id).isEmpty { throw CloudEventError(.missingAttribute, attribute: "id", "'id' is empty") }
        if source.isEmpty { throw CloudEventError(.missingAttribute, attribute: "source", "'source' is empty") }
        if type.isEmpty { throw CloudEventError(.missingAttribute, attribute: "type", "'type' is empty") }
        if specversion != CloudEvent.specVersion {
            throw CloudEventError(
                .unsupportedSpecVersion, attribute: "specversion",
                "'specversion' is '\(specversion)'; only '1.0' is supported")
        }
        for name in extensions.keys { try CloudEvent.validateExtensionName(name) }
    }

    private func description(of id: EventID) -> String { id.description }

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

@usableFromInline
final class OptionalAttributes: @unchecked Sendable {
    // Safe: only mutated through `CloudEvent.mutateOptional`, which copies unless uniquely referenced,
    // so a shared instance is never written to.
    var subject: String?
    var datacontenttype: String?
    var dataschema: String?
    var recipient: String?
    var correlationid: String?
    var causationid: String?
    var partitionkey: String?
    var traceparent: String?
    var tracestate: String?
    var extensions: [String: ExtensionValue] = [:]

    @usableFromInline
    init() {}

    @usableFromInline
    func copy() -> OptionalAttributes {
        let other = OptionalAttributes()
        other.subject = subject
        other.datacontenttype = datacontenttype
        other.dataschema = dataschema
        other.recipient = recipient
        other.correlationid = correlationid
        other.causationid = causationid
        other.partitionkey = partitionkey
        other.traceparent = traceparent
        other.tracestate = tracestate
        other.extensions = extensions
        return other
    }
}

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
