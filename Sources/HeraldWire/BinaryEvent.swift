import Herald

/// A CloudEvent in Herald's binary form: attributes as typed headers, data as raw bytes. The broker stores these
/// two blobs as a log record's headers and payload and sends them back unchanged, so it never re-encodes events.
///
/// Headers: `u8 flags (bit 0: has data) | u16 count | count × (u8 name length | name | u8 tag | value)`, where a
/// value is a string (tag 0: `u32 length | UTF-8`), an integer (tag 1: `i32`), a boolean (tag 2: `u8`) or a
/// timestamp (tag 3: `i64` nanoseconds since the epoch). All integers little-endian.
public struct WireEvent: Sendable, Hashable {
    public var headers: [UInt8]
    public var data: [UInt8]

    public init(headers: [UInt8], data: [UInt8]) {
        self.headers = headers
        self.data = data
    }

    /// Bytes this event takes on the wire and in the log.
    public var size: Int { headers.count + data.count }
}

/// What the broker needs from an event's headers: identity for dedup, the partition key, the type.
public struct EventSummary: Sendable, Hashable {
    public var id: String
    public var source: String
    public var type: String
    public var partitionKey: String?
}

public enum BinaryEvent {
    enum Tag: UInt8 {
        case string = 0
        case integer = 1
        case boolean = 2
        case timestamp = 3
    }

    /// Encodes an event; typed data is encoded as JSON (with `datacontenttype` defaulting to application/json).
    public static func encode(_ event: CloudEvent) throws(CloudEventError) -> WireEvent {
        try event.validate()
        let data = try event.data.encoded()
        var headers: [UInt8] = []
        headers.reserveCapacity(160)
        headers.append(data == nil ? 0 : 1)
        headers.append(contentsOf: [0, 0])
        var count: UInt16 = 0
        func string(_ name: String, _ value: String?) {
            guard let value else { return }
            entry(name, .string)
            headers.appendInteger(UInt32(value.utf8.count))
            headers.append(contentsOf: value.utf8)
        }
        func entry(_ name: String, _ tag: Tag) {
            headers.append(UInt8(name.utf8.count))
            headers.append(contentsOf: name.utf8)
            headers.append(tag.rawValue)
            count += 1
        }
        string("specversion", event.specversion)
        string("id", event.id.description)
        string("source", event.source)
        string("type", event.type)
        if let time = event.time {
            entry("time", .timestamp)
            headers.appendInteger(UInt64(bitPattern: time.nanosecondsSinceEpoch))
        }
        string("subject", event.subject)
        var contentType = event.datacontenttype
        if contentType == nil, case .value = event.data { contentType = "application/json" }
        string("datacontenttype", contentType)
        string("dataschema", event.dataschema)
        for (name, value) in event.allExtensions {
            switch value {
            case .string(let text): string(name, text)
            case .integer(let number):
                entry(name, .integer)
                headers.appendInteger(UInt32(bitPattern: number))
            case .boolean(let flag):
                entry(name, .boolean)
                headers.append(flag ? 1 : 0)
            }
        }
        headers[1] = UInt8(truncatingIfNeeded: count)
        headers[2] = UInt8(truncatingIfNeeded: count >> 8)
        return WireEvent(headers: headers, data: data ?? [])
    }

    /// Decodes an event; throws a `CloudEventError` naming the first problem.
    public static func decode(_ wire: WireEvent) throws(CloudEventError) -> CloudEvent {
        var specversion: String?
        var id: String?
        var source: String?
        var type: String?
        var time: Timestamp?
        var optional: [(String, ExtensionValue)] = []
        var subject: String?
        var contentType: String?
        var schema: String?
        let hasData = try visit(wire.headers) { (name: String, value: Value) throws(CloudEventError) in
            switch (name, value) {
            case ("specversion", .string(let text)): specversion = text
            case ("id", .string(let text)): id = text
            case ("source", .string(let text)): source = text
            case ("type", .string(let text)): type = text
            case ("time", .timestamp(let nanoseconds)): time = Timestamp(nanosecondsSinceEpoch: nanoseconds)
            case ("subject", .string(let text)): subject = text
            case ("datacontenttype", .string(let text)): contentType = text
            case ("dataschema", .string(let text)): schema = text
            case ("specversion", _), ("id", _), ("source", _), ("type", _), ("time", _), ("subject", _),
                ("datacontenttype", _), ("dataschema", _):
                throw CloudEventError(.invalidAttributeType, attribute: name, "attribute '\(name)' has the wrong type")
            case (_, .string(let text)): optional.append((name, .string(text)))
            case (_, .integer(let number)): optional.append((name, .integer(number)))
            case (_, .boolean(let flag)): optional.append((name, .boolean(flag)))
            case (_, .timestamp):
                throw CloudEventError(
                    .invalidAttributeType, attribute: name, "extension '\(name)' cannot be a timestamp")
            }
        }
        try checkRequired(specversion: specversion, id: id, source: source, type: type)
        var event = CloudEvent(
            id: EventID(id!), source: source!, type: type!, time: time, data: hasData ? .bytes(wire.data) : .none)
        event.subject = subject
        event.datacontenttype = contentType
        event.dataschema = schema
        for (name, value) in optional { try event.setExtension(name, value) }
        return event
    }

    /// Checks an event's headers without building the event: required attributes, names and types.
    public static func summary(_ headers: [UInt8]) throws(CloudEventError) -> EventSummary {
        var specversion: String?
        var id: String?
        var source: String?
        var type: String?
        var key: String?
        _ = try visit(headers) { (name: String, value: Value) throws(CloudEventError) in
            switch name {
            case "specversion", "id", "source", "type", "partitionkey", "subject", "datacontenttype", "dataschema",
                "recipient", "correlationid", "causationid", "traceparent", "tracestate":
                guard case .string(let text) = value else {
                    throw CloudEventError(
                        .invalidAttributeType, attribute: name, "attribute '\(name)' must be a string")
                }
                switch name {
                case "specversion": specversion = text
                case "id": id = text
                case "source": source = text
                case "type": type = text
                case "partitionkey": key = text
                default: break
                }
            case "time":
                guard case .timestamp = value else {
                    throw CloudEventError(.invalidAttributeType, attribute: name, "'time' must be a timestamp")
                }
            default:
                try CloudEvent.validateExtensionName(name)
            }
        }
        try checkRequired(specversion: specversion, id: id, source: source, type: type)
        return EventSummary(id: id!, source: source!, type: type!, partitionKey: key)
    }

    static func checkRequired(specversion: String?, id: String?, source: String?, type: String?)
        throws(CloudEventError)
    {
        for (name, value) in [("specversion", specversion), ("id", id), ("source", source), ("type", type)] {
            guard let value, !value.isEmpty else {
                throw CloudEventError(.missingAttribute, attribute: name, "required attribute '\(name)' is missing")
            }
        }
        guard specversion == CloudEvent.specVersion else {
            throw CloudEventError(
                .unsupportedSpecVersion, attribute: "specversion",
                "'specversion' is '\(specversion!)'; only '1.0' is supported")
        }
    }

    enum Value {
        case string(String)
        case integer(Int32)
        case boolean(Bool)
        case timestamp(Int64)
    }

    /// Walks the header entries; returns the has-data flag. Every length is checked against what is left.
    static func visit(_ headers: [UInt8], _ body: (String, Value) throws(CloudEventError) -> Void)
        throws(CloudEventError) -> Bool
    {
        func malformed(_ what: String) -> CloudEventError {
            CloudEventError(.malformedJSON, "binary event headers are malformed: \(what)")
        }
        guard headers.count >= 3 else { throw malformed("shorter than 3 bytes") }
        let flags = headers[0]
        guard flags & ~1 == 0 else { throw malformed("unknown flags \(flags)") }
        let count = Int(headers[1]) | Int(headers[2]) << 8
        var cursor = 3
        // Few attributes: a linear search beats hashing every name.
        var seen: [String] = []
        seen.reserveCapacity(count)
        for _ in 0..<count {
            guard cursor < headers.count else { throw malformed("fewer entries than announced") }
            let nameLength = Int(headers[cursor])
            cursor += 1
            guard cursor + nameLength + 1 <= headers.count else { throw malformed("a name overruns the headers") }
            let name = String(decoding: headers[cursor..<(cursor + nameLength)], as: UTF8.self)
            cursor += nameLength
            guard !seen.contains(name) else { throw malformed("attribute '\(name)' appears twice") }
            seen.append(name)
            guard let tag = Tag(rawValue: headers[cursor]) else { throw malformed("unknown value tag") }
            cursor += 1
            let value: Value
            switch tag {
            case .string:
                guard cursor + 4 <= headers.count else { throw malformed("a string length overruns the headers") }
                let length = Int(headers.readInteger(at: cursor, as: UInt32.self))
                cursor += 4
                guard length <= headers.count - cursor else { throw malformed("a string overruns the headers") }
                guard let text = String(validating: headers[cursor..<(cursor + length)], as: UTF8.self) else {
                    throw CloudEventError(.invalidAttributeValue, attribute: name, "'\(name)' is not valid UTF-8")
                }
                value = .string(text)
                cursor += length
            case .integer:
                guard cursor + 4 <= headers.count else { throw malformed("an integer overruns the headers") }
                value = .integer(Int32(bitPattern: headers.readInteger(at: cursor, as: UInt32.self)))
                cursor += 4
            case .boolean:
                guard cursor < headers.count, headers[cursor] <= 1 else { throw malformed("a boolean is not 0 or 1") }
                value = .boolean(headers[cursor] == 1)
                cursor += 1
            case .timestamp:
                guard cursor + 8 <= headers.count else { throw malformed("a timestamp overruns the headers") }
                value = .timestamp(Int64(bitPattern: headers.readInteger(at: cursor, as: UInt64.self)))
                cursor += 8
            }
            try body(name, value)
        }
        guard cursor == headers.count else { throw malformed("\(headers.count - cursor) bytes after the last entry") }
        return flags & 1 == 1
    }
}

extension Array where Element == UInt8 {
    @inline(__always)
    mutating func appendInteger<T: FixedWidthInteger>(_ value: T) {
        Swift.withUnsafeBytes(of: value.littleEndian) { append(contentsOf: $0) }
    }

    @inline(__always)
    func readInteger<T: FixedWidthInteger>(at index: Int, as: T.Type) -> T {
        withUnsafeBytes { T(littleEndian: $0.loadUnaligned(fromByteOffset: index, as: T.self)) }
    }
}
