import Foundation

/// The CloudEvents JSON event format (structured mode, `application/cloudevents+json`) and its batch format
/// (`application/cloudevents-batch+json`).
///
/// JSON data is embedded as `data`; any other data is `data_base64`. Extensions are top-level members.
/// Decoding is strict and never traps: every problem is a `CloudEventError` naming it.
public enum CloudEventJSON {
    public static let contentType = "application/cloudevents+json"
    public static let batchContentType = "application/cloudevents-batch+json"

    /// Whether a `datacontenttype` denotes JSON (absent counts as JSON, as the spec says for this format).
    public static func isJSON(_ contentType: String?) -> Bool {
        guard let contentType else { return true }
        let media = contentType.split(separator: ";", maxSplits: 1).first.map {
            $0.trimmingCharacters(in: .whitespaces).lowercased()
        }
        guard let media else { return true }
        return media == "application/json" || media == "text/json" || media.hasSuffix("+json")
    }

    // MARK: Encoding

    /// A JSON string literal for `value` (quotes and escapes included).
    public static func quoted(_ value: String) -> [UInt8] {
        var writer = JSONWriter(capacity: value.utf8.count + 2)
        writer.string(value)
        return writer.bytes
    }

    /// The structured-mode JSON text of one event.
    public static func encode(_ event: CloudEvent) throws(CloudEventError) -> [UInt8] {
        var writer = JSONWriter()
        try write(event, into: &writer)
        return writer.bytes
    }

    /// The batch-mode JSON text of several events.
    public static func encodeBatch(_ events: [CloudEvent]) throws(CloudEventError) -> [UInt8] {
        var writer = JSONWriter(capacity: 256 * events.count)
        writer.bytes.append(UInt8(ascii: "["))
        for (index, event) in events.enumerated() {
            if index > 0 { writer.bytes.append(UInt8(ascii: ",")) }
            try write(event, into: &writer)
        }
        writer.bytes.append(UInt8(ascii: "]"))
        return writer.bytes
    }

    static func write(_ event: CloudEvent, into writer: inout JSONWriter) throws(CloudEventError) {
        try event.validate()
        writer.raw("{\"specversion\":")
        writer.string(event.specversion)
        writer.raw(",\"id\":")
        writer.string(event.id.description)
        writer.raw(",\"source\":")
        writer.string(event.source)
        writer.raw(",\"type\":")
        writer.string(event.type)
        if let time = event.time {
            writer.raw(",\"time\":")
            writer.string(RFC3339.format(time))
        }
        func optional(_ name: StaticString, _ value: String?) {
            guard let value else { return }
            writer.raw(",\"")
            writer.raw(name)
            writer.raw("\":")
            writer.string(value)
        }
        optional("subject", event.subject)
        optional("dataschema", event.dataschema)
        var contentType = event.datacontenttype
        if case .value = event.data, contentType == nil { contentType = "application/json" }
        optional("datacontenttype", contentType)
        for (name, value) in event.allExtensions {
            writer.raw(",")
            writer.string(name)
            writer.raw(":")
            switch value {
            case .string(let text): writer.string(text)
            case .integer(let number): writer.bytes.append(contentsOf: String(number).utf8)
            case .boolean(let flag): flag ? writer.raw("true") : writer.raw("false")
            }
        }
        if let data = try event.data.encoded() {
            if isJSON(contentType) {
                try checkJSON(data)
                writer.raw(",\"data\":")
                writer.raw(data)
            } else {
                writer.raw(",\"data_base64\":\"")
                writer.bytes.append(contentsOf: Data(data).base64EncodedData())
                writer.raw("\"")
            }
        }
        writer.raw("}")
    }

    /// Throws unless the bytes are one well-formed JSON value.
    static func checkJSON(_ data: [UInt8]) throws(CloudEventError) {
        try data.withUnsafeBufferPointer { buffer throws(CloudEventError) in
            var reader = JSONReader(buffer)
            do throws(CloudEventError) {
                _ = try reader.readValue()
                try reader.expectEnd()
            } catch {
                throw CloudEventError(
                    .invalidData, attribute: "data",
                    "data is declared as JSON but is not valid JSON (\(error.message))")
            }
        }
    }

    // MARK: Decoding

    /// Decodes one structured-mode event.
    public static func decode(_ bytes: [UInt8]) throws(CloudEventError) -> CloudEvent {
        try bytes.withUnsafeBufferPointer { buffer throws(CloudEventError) in
            var reader = JSONReader(buffer)
            let event = try readEvent(&reader)
            try reader.expectEnd()
            return event
        }
    }

    /// Decodes a batch (a JSON array of structured-mode events). An error names the index of the bad event.
    public static func decodeBatch(_ bytes: [UInt8]) throws(CloudEventError) -> [CloudEvent] {
        try bytes.withUnsafeBufferPointer { buffer throws(CloudEventError) in
            var reader = JSONReader(buffer)
            var events: [CloudEvent] = []
            guard try reader.peek() == UInt8(ascii: "[") else {
                throw CloudEventError(.malformedJSON, "a batch must be a JSON array of CloudEvents")
            }
            try reader.readArray { (reader: inout JSONReader) throws(CloudEventError) in
                do throws(CloudEventError) {
                    events.append(try readEvent(&reader))
                } catch {
                    throw CloudEventError(
                        error.code, attribute: error.attribute, "event \(events.count): \(error.message)")
                }
            }
            try reader.expectEnd()
            return events
        }
    }

    static func readEvent(_ reader: inout JSONReader) throws(CloudEventError) -> CloudEvent {
        guard try reader.peek() == UInt8(ascii: "{") else {
            throw CloudEventError(.malformedJSON, "a CloudEvent must be a JSON object")
        }
        var attributes: [String: JSONValue] = [:]
        var dataRange: Range<Int>?
        var dataValue: JSONValue?
        try reader.readObject { (reader: inout JSONReader, key: String) throws(CloudEventError) in
            if attributes[key] != nil || (key == "data" && dataRange != nil) {
                throw CloudEventError(.malformedJSON, attribute: key, "attribute '\(key)' appears twice")
            }
            if key == "data" {
                let start = reader.index
                dataValue = try reader.readValue()
                dataRange = start..<reader.index
            } else {
                attributes[key] = try reader.readValue()
            }
        }
        let buffer = reader.bytes

        func string(_ name: String, required: Bool) throws(CloudEventError) -> String? {
            switch attributes[name] {
            case .none, .null?:
                if required {
                    throw CloudEventError(.missingAttribute, attribute: name, "required attribute '\(name)' is missing")
                }
                return nil
            case .string(let text)?:
                if required && text.isEmpty {
                    throw CloudEventError(.missingAttribute, attribute: name, "required attribute '\(name)' is empty")
                }
                return text
            case let other?:
                throw CloudEventError(
                    .invalidAttributeType, attribute: name,
                    "attribute '\(name)' must be a string, not \(other.kindName)")
            }
        }

        let specversion = try string("specversion", required: true)!
        guard specversion == CloudEvent.specVersion else {
            throw CloudEventError(
                .unsupportedSpecVersion, attribute: "specversion",
                "'specversion' is '\(specversion)'; only '1.0' is supported")
        }
        let id = try string("id", required: true)!
        let source = try string("source", required: true)!
        let type = try string("type", required: true)!
        var time: Timestamp?
        if let text = try string("time", required: false) {
            guard let parsed = RFC3339.parse(text) else {
                throw CloudEventError(
                    .invalidAttributeValue, attribute: "time",
                    "'time' is not an RFC 3339 time between the years 1678 and 2262: '\(text)'")
            }
            time = parsed
        }
        var event = CloudEvent(id: EventID(id), source: source, type: type, time: time)
        event.subject = try string("subject", required: false)
        event.dataschema = try string("dataschema", required: false)
        event.datacontenttype = try string("datacontenttype", required: false)

        let base64 = try string("data_base64", required: false)
        if let dataValue, base64 != nil, dataValue != .null {
            throw CloudEventError(.invalidData, attribute: "data", "'data' and 'data_base64' are mutually exclusive")
        }
        if let base64 {
            guard let decoded = Data(base64Encoded: base64) else {
                throw CloudEventError(.invalidData, attribute: "data_base64", "'data_base64' is not valid base64")
            }
            event.data = .bytes([UInt8](decoded))
        } else if let dataValue, let dataRange, dataValue != .null {
            if case .string(let text) = dataValue, !isJSON(event.datacontenttype) {
                event.data = .bytes(Array(text.utf8))
            } else {
                event.data = .bytes(Array(buffer[dataRange]).trimmingJSONWhitespace())
            }
        }

        let core: Set<String> = [
            "specversion", "id", "source", "type", "time", "subject", "dataschema",
            "datacontenttype", "data_base64",
        ]
        for (name, value) in attributes where !core.contains(name) {
            let extensionValue: ExtensionValue?
            switch value {
            case .null: extensionValue = nil
            case .string(let text): extensionValue = .string(text)
            case .bool(let flag): extensionValue = .boolean(flag)
            case .number(let text):
                guard let integer = Int32(text) else {
                    throw CloudEventError(
                        .invalidAttributeType, attribute: name,
                        "extension '\(name)' is \(text); CloudEvents integers are 32-bit whole numbers")
                }
                extensionValue = .integer(integer)
            default:
                throw CloudEventError(
                    .invalidAttributeType, attribute: name,
                    "extension '\(name)' must be a string, number or boolean, not \(value.kindName)")
            }
            try event.setExtension(name, extensionValue)
        }
        return event
    }
}

extension Array where Element == UInt8 {
    func trimmingJSONWhitespace() -> [UInt8] {
        func isSpace(_ byte: UInt8) -> Bool { byte == 0x20 || byte == 0x0A || byte == 0x0D || byte == 0x09 }
        var start = startIndex
        var end = endIndex
        while start < end, isSpace(self[start]) { start += 1 }
        while end > start, isSpace(self[end - 1]) { end -= 1 }
        return Array(self[start..<end])
    }
}

/// JSON coding of typed event values (the `data` of Herald's own events).
public enum EventCoding {
    public static func encode(_ value: any Event) throws -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        encoder.dateEncodingStrategy = .iso8601
        return [UInt8](try encoder.encode(value))
    }

    public static func decode<E: Event>(_ type: E.Type, from bytes: [UInt8]) throws -> E {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return try decoder.decode(E.self, from: Data(bytes))
    }
}
