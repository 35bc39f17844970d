/// The CloudEvents HTTP protocol binding's binary content mode: attributes as `ce-` headers, data as the body,
/// `datacontenttype` as `Content-Type`. Pure mapping (no HTTP library): the broker's HTTP API, its push
/// deliveries and HTTP clients share it.
///
/// Header values are percent-encoded as the binding requires: space, `"`, `%` and every byte outside printable
/// ASCII (U+0021–U+007E) of the UTF-8 form become `%XX`; decoding reverses that and refuses invalid escapes or
/// invalid UTF-8.
public enum CloudEventHTTPBinding {
    /// `name=integer,name=boolean` for extensions that are not strings.
    public static let typesHeader = "herald-attribute-types"

    /// Header names are lowercase.
    public static func encodeBinary(_ event: CloudEvent) throws(CloudEventError) -> (
        headers: [(name: String, value: String)], body: [UInt8]
    ) {
        try event.validate()
        var headers: [(name: String, value: String)] = [
            ("ce-specversion", event.specversion), ("ce-id", percentEncode(event.id.description)),
            ("ce-source", percentEncode(event.source)), ("ce-type", percentEncode(event.type)),
        ]
        if let time = event.time { headers.append(("ce-time", RFC3339.format(time))) }
        if let subject = event.subject { headers.append(("ce-subject", percentEncode(subject))) }
        if let schema = event.dataschema { headers.append(("ce-dataschema", percentEncode(schema))) }
        var types: [String] = []
        for (name, value) in event.allExtensions {
            headers.append(("ce-" + name, percentEncode(value.description)))
            switch value {
            case .string: break
            case .integer: types.append(name + "=integer")
            case .boolean: types.append(name + "=boolean")
            }
        }
        // Binary mode carries every value as a string; this Herald header keeps integer and boolean extensions
        // typed between Herald peers (other receivers ignore it).
        if !types.isEmpty { headers.append((typesHeader, types.joined(separator: ","))) }
        let body = try event.data.encoded() ?? []
        if let type = event.datacontenttype {
            headers.append(("content-type", type))
        } else if case .value = event.data {
            headers.append(("content-type", "application/json"))
        }
        return (headers, body)
    }

    /// Builds an event from binary-mode headers (any case) and the body. `ce-specversion`, `ce-id`, `ce-source`
    /// and `ce-type` are required; other `ce-` headers become attributes or extensions.
    public static func decodeBinary(headers: [(name: String, value: String)], body: [UInt8])
        throws(CloudEventError) -> CloudEvent
    {
        var attributes: [String: String] = [:]
        var contentType: String?
        var types: [String: String] = [:]
        for (name, value) in headers {
            let lower = name.lowercased()
            if lower == "content-type" {
                contentType = value
                continue
            }
            if lower == typesHeader {
                for entry in value.split(separator: ",") {
                    let parts = entry.split(separator: "=", maxSplits: 1)
                    if parts.count == 2 { types[String(parts[0])] = String(parts[1]) }
                }
                continue
            }
            guard lower.hasPrefix("ce-") else { continue }
            let attribute = String(lower.dropFirst(3))
            guard attributes[attribute] == nil else {
                throw CloudEventError(
                    .invalidAttributeValue, attribute: attribute, "the header ce-\(attribute) appears more than once")
            }
            attributes[attribute] = try percentDecode(value, attribute: attribute)
        }
        func required(_ name: String) throws(CloudEventError) -> String {
            guard let value = attributes.removeValue(forKey: name), !value.isEmpty else {
                throw CloudEventError(
                    .missingAttribute, attribute: name,
                    "binary mode needs the header ce-\(name) (or send application/cloudevents+json)")
            }
            return value
        }
        let specversion = try required("specversion")
        guard specversion == CloudEvent.specVersion else {
            throw CloudEventError(
                .unsupportedSpecVersion, attribute: "specversion",
                "ce-specversion is '\(specversion)'; only '1.0' is supported")
        }
        let id = try required("id")
        let source = try required("source")
        let type = try required("type")
        var time: Timestamp?
        if let text = attributes.removeValue(forKey: "time") {
            guard let parsed = RFC3339.parse(text) else {
                throw CloudEventError(
                    .invalidAttributeValue, attribute: "time", "ce-time is not an RFC 3339 time: '\(text)'")
            }
            time = parsed
        }
        var event = CloudEvent(
            id: EventID(id), source: source, type: type, time: time, data: body.isEmpty ? .none : .bytes(body))
        event.datacontenttype = contentType
        event.subject = attributes.removeValue(forKey: "subject")
        event.dataschema = attributes.removeValue(forKey: "dataschema")
        for (name, value) in attributes.sorted(by: { $0.key < $1.key }) {
            guard name != "data", name != "datacontenttype" else {
                throw CloudEventError(
                    .invalidAttributeValue, attribute: name, "ce-\(name) is not allowed; use Content-Type and the body")
            }
            switch types[name] {
            case "integer":
                guard let number = Int32(value) else {
                    throw CloudEventError(.invalidAttributeValue, attribute: name, "ce-\(name) is not an integer")
                }
                try event.setExtension(name, .integer(number))
            case "boolean":
                guard value == "true" || value == "false" else {
                    throw CloudEventError(.invalidAttributeValue, attribute: name, "ce-\(name) is not a boolean")
                }
                try event.setExtension(name, .boolean(value == "true"))
            default:
                try event.setExtension(name, .string(value))
            }
        }
        try event.validate()
        return event
    }

    /// Percent-encodes a header value as the binding requires.
    public static func percentEncode(_ value: String) -> String {
        var needs = false
        for byte in value.utf8 where byte <= 0x20 || byte >= 0x7F || byte == 0x22 || byte == 0x25 {
            needs = true
            break
        }
        guard needs else { return value }
        let hex = Array("0123456789ABCDEF".utf8)
        var out: [UInt8] = []
        out.reserveCapacity(value.utf8.count + 16)
        for byte in value.utf8 {
            if byte <= 0x20 || byte >= 0x7F || byte == 0x22 || byte == 0x25 {
                out.append(UInt8(ascii: "%"))
                out.append(hex[Int(byte >> 4)])
                out.append(hex[Int(byte & 0x0F)])
            } else {
                out.append(byte)
            }
        }
        return String(decoding: out, as: UTF8.self)
    }

    /// Reverses `percentEncode`; a broken escape or bytes that are not UTF-8 are an error naming the attribute.
    public static func percentDecode(_ value: String, attribute: String) throws(CloudEventError) -> String {
        guard value.utf8.contains(UInt8(ascii: "%")) else { return value }
        var bytes: [UInt8] = []
        var iterator = value.utf8.makeIterator()
        func nibble(_ byte: UInt8?) -> UInt8? {
            switch byte {
            case let b? where b >= 0x30 && b <= 0x39: b - 0x30
            case let b? where b >= 0x41 && b <= 0x46: b - 0x41 + 10
            case let b? where b >= 0x61 && b <= 0x66: b - 0x61 + 10
            default: nil
            }
        }
        while let byte = iterator.next() {
            guard byte == UInt8(ascii: "%") else {
                bytes.append(byte)
                continue
            }
            guard let high = nibble(iterator.next()), let low = nibble(iterator.next()) else {
                throw CloudEventError(
                    .invalidAttributeValue, attribute: attribute, "ce-\(attribute) has a broken percent-escape")
            }
            bytes.append(high << 4 | low)
        }
        guard let text = String(validating: bytes, as: UTF8.self) else {
            throw CloudEventError(
                .invalidAttributeValue, attribute: attribute, "ce-\(attribute) does not decode to UTF-8 text")
        }
        return text
    }
}

extension Timestamp {
    /// Parses an RFC 3339 time (`2026-11-26T21:00:00.5Z`); nil when it is not one.
    public init?(rfc3339 text: String) {
        guard let parsed = RFC3339.parse(text) else { return nil }
        self = parsed
    }

    /// The RFC 3339 form, in UTC.
    public var rfc3339: String { RFC3339.format(self) }
}
