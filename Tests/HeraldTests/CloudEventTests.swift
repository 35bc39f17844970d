import Foundation
import Herald
import HeraldTesting
import Testing

struct Greeting: Event, Hashable {
    static let eventType = "com.example.greeting"
    var text: String
    var count: Int
}

@Suite("CloudEvents JSON format")
struct CloudEventTests {
    func text(_ bytes: [UInt8]) -> String { String(decoding: bytes, as: UTF8.self) }

    @Test func structuredRoundTripKeepsEveryAttribute() throws {
        var event = CloudEvent(Greeting(text: "hi", count: 2), source: "svc")
        event.subject = "subj"
        event.dataschema = "https://example.com/schema"
        event.recipient = "payments"
        event.correlationid = "c1"
        event.causationid = "c0"
        event.partitionkey = "k"
        event.traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        event.tracestate = "vendor=1"
        event.extensions["tenant"] = .string("acme")
        event.extensions["retries"] = .integer(-3)
        event.extensions["urgent"] = .boolean(true)
        let json = try CloudEventJSON.encode(event)
        let decoded = try CloudEventJSON.decode(json)
        #expect(decoded.id == event.id)
        #expect(decoded.source == "svc" && decoded.type == Greeting.eventType && decoded.specversion == "1.0")
        #expect(decoded.time == event.time)
        #expect(decoded.subject == "subj" && decoded.dataschema == "https://example.com/schema")
        #expect(decoded.recipient == "payments" && decoded.correlationid == "c1" && decoded.causationid == "c0")
        #expect(
            decoded.partitionkey == "k" && decoded.traceparent == event.traceparent && decoded.tracestate == "vendor=1")
        #expect(decoded.extensions == ["tenant": .string("acme"), "retries": .integer(-3), "urgent": .boolean(true)])
        #expect(decoded.datacontenttype == "application/json")
        let greeting = try EventRegistryTests.registry().decode(decoded)
        guard case .known(let value as Greeting, _) = greeting else {
            Issue.record("not decoded as Greeting")
            return
        }
        #expect(value == Greeting(text: "hi", count: 2))
    }

    @Test func jsonDataIsEmbeddedAndExtensionsAreTopLevel() throws {
        var event = CloudEvent(
            id: EventID("1"), source: "s", type: "t", time: nil, data: .bytes(Array(#"{"a":[1,2]}"#.utf8)))
        event.partitionkey = "k"
        let json = text(try CloudEventJSON.encode(event))
        #expect(json.contains(#""data":{"a":[1,2]}"#))
        #expect(json.contains(#""partitionkey":"k""#))
        #expect(!json.contains("data_base64"))
    }

    @Test func binaryDataUsesDataBase64() throws {
        var event = CloudEvent(id: EventID("1"), source: "s", type: "t", data: .bytes([0, 255, 10]))
        event.datacontenttype = "application/octet-stream"
        let json = text(try CloudEventJSON.encode(event))
        #expect(json.contains(#""data_base64":"AP8K""#))
        let decoded = try CloudEventJSON.decode(Array(json.utf8))
        guard case .bytes(let bytes) = decoded.data else {
            Issue.record("no data")
            return
        }
        #expect(bytes == [0, 255, 10])
    }

    @Test func textDataDecodesAsItsUTF8Bytes() throws {
        let json =
            #"{"specversion":"1.0","id":"1","source":"s","type":"t","datacontenttype":"text/plain","data":"héllo"}"#
        let decoded = try CloudEventJSON.decode(Array(json.utf8))
        guard case .bytes(let bytes) = decoded.data else {
            Issue.record("no data")
            return
        }
        #expect(String(decoding: bytes, as: UTF8.self) == "héllo")
    }

    static let base: Int64 = 1_795_709_563 * 1_000_000_000
    static let times: [(String, Int64)] = [
        ("2026-11-26T16:12:43Z", base),
        ("2026-11-26T16:12:43.5Z", base + 500_000_000),
        ("2026-11-26T18:12:43.000000001+02:00", base + 1),
        ("1970-01-01T00:00:00Z", 0),
        ("2024-02-29T00:00:00z", 1_709_164_800 * 1_000_000_000),
    ]

    @Test(arguments: 0..<times.count)
    func rfc3339TimesParse(_ index: Int) throws {
        let (text, nanos) = CloudEventTests.times[index]
        let json = #"{"specversion":"1.0","id":"1","source":"s","type":"t","time":"\#(text)"}"#
        let decoded = try CloudEventJSON.decode(Array(json.utf8))
        #expect(decoded.time?.nanosecondsSinceEpoch == nanos)
    }

    @Test func timesFormatInUTCWithFractionOnlyWhenNeeded() {
        #expect(Timestamp(nanosecondsSinceEpoch: 0).description == "1970-01-01T00:00:00Z")
        #expect(Timestamp(nanosecondsSinceEpoch: 1_500_000_000).description == "1970-01-01T00:00:01.500Z")
        #expect(Timestamp(nanosecondsSinceEpoch: 1_000_001_000).description == "1970-01-01T00:00:01.000001Z")
    }

    static let malformed: [(String, CloudEventError.Code, String?)] = [
        ("{", .malformedJSON, nil),
        ("[]", .malformedJSON, nil),
        (#"{"id":"1","source":"s","type":"t"}"#, .missingAttribute, "specversion"),
        (#"{"specversion":"1.0","source":"s","type":"t"}"#, .missingAttribute, "id"),
        (#"{"specversion":"1.0","id":"1","type":"t"}"#, .missingAttribute, "source"),
        (#"{"specversion":"1.0","id":"1","source":"s"}"#, .missingAttribute, "type"),
        (#"{"specversion":"1.0","id":"","source":"s","type":"t"}"#, .missingAttribute, "id"),
        (#"{"specversion":"1.0","id":7,"source":"s","type":"t"}"#, .invalidAttributeType, "id"),
        (#"{"specversion":"0.3","id":"1","source":"s","type":"t"}"#, .unsupportedSpecVersion, "specversion"),
        (#"{"specversion":"1.0","id":"1","source":"s","type":"t","time":"yesterday"}"#, .invalidAttributeValue, "time"),
        (#"{"specversion":"1.0","id":"1","source":"s","type":"t","Bad_Name":"x"}"#, .invalidExtensionName, "Bad_Name"),
        (#"{"specversion":"1.0","id":"1","source":"s","type":"t","ext":1.5}"#, .invalidAttributeType, "ext"),
        (#"{"specversion":"1.0","id":"1","source":"s","type":"t","ext":{"a":1}}"#, .invalidAttributeType, "ext"),
        (
            #"{"specversion":"1.0","id":"1","source":"s","type":"t","partitionkey":5}"#, .invalidAttributeType,
            "partitionkey"
        ),
        (
            #"{"specversion":"1.0","id":"1","source":"s","type":"t","data":1,"data_base64":"AA=="}"#, .invalidData,
            "data"
        ),
        (#"{"specversion":"1.0","id":"1","source":"s","type":"t","data_base64":"!!"}"#, .invalidData, "data_base64"),
        (#"{"specversion":"1.0","id":"1","id":"2","source":"s","type":"t"}"#, .malformedJSON, "id"),
    ]

    @Test(arguments: 0..<malformed.count)
    func malformedInputGetsATypedErrorNamingTheProblem(_ index: Int) {
        let (json, code, attribute) = CloudEventTests.malformed[index]
        do {
            _ = try CloudEventJSON.decode(Array(json.utf8))
            Issue.record("accepted \(json)")
        } catch {
            #expect(error.code == code, "\(json): \(error)")
            if let attribute { #expect(error.attribute == attribute, "\(json): \(error)") }
            if let attribute { #expect(error.message.contains(attribute)) }
        }
    }

    @Test func batchRoundTripsAndErrorsNameTheEvent() throws {
        let events = (0..<3).map {
            CloudEvent(id: EventID("e\($0)"), source: "s", type: "t", data: .bytes(Array("\($0)".utf8)))
        }
        let json = try CloudEventJSON.encodeBatch(events)
        let decoded = try CloudEventJSON.decodeBatch(json)
        #expect(decoded.map(\.id) == events.map(\.id))
        #expect(try CloudEventJSON.decodeBatch(Array("[]".utf8)).isEmpty)
        let bad = #"[{"specversion":"1.0","id":"1","source":"s","type":"t"},{"specversion":"1.0","id":"2","type":"t"}]"#
        #expect {
            try CloudEventJSON.decodeBatch(Array(bad.utf8))
        } throws: { error in
            let error = error as! CloudEventError
            return error.code == .missingAttribute && error.message.hasPrefix("event 1:")
        }
    }

    @Test func extensionNamesAreValidated() {
        var event = CloudEvent(source: "s", type: "t")
        #expect(throws: CloudEventError.self) { try event.setExtension("UPPER", .string("x")) }
        #expect(throws: CloudEventError.self) { try event.setExtension("with-dash", .string("x")) }
        #expect(throws: CloudEventError.self) { try event.setExtension("source", .string("x")) }
        #expect(throws: CloudEventError.self) { try event.setExtension("recipient", .integer(1)) }
        event.extensions["Nope"] = .string("x")
        #expect(throws: CloudEventError.self) { try CloudEventJSON.encode(event) }
    }

    /// Random mutations of valid events never crash the decoder: each either decodes or throws CloudEventError.
    @Test func mutatedInputNeverCrashes() throws {
        var event = CloudEvent(Greeting(text: "héllo \"q\" \\ \u{1}", count: 1), source: "s")
        event.extensions["n"] = .integer(4)
        let seed = try CloudEventJSON.encodeBatch([event, event])
        var generator = SplitMix(seed: 7)
        var decoded = 0
        for _ in 0..<20_000 {
            var bytes = seed
            for _ in 0..<Int(generator.next() % 4 + 1) {
                let position = Int(generator.next() % UInt64(bytes.count))
                switch generator.next() % 3 {
                case 0: bytes[position] = UInt8(truncatingIfNeeded: generator.next())
                case 1: bytes.remove(at: position)
                default:
                    let structural = Array(#"{}[]",:\"#.utf8)
                    bytes.insert(structural[Int(generator.next() % UInt64(structural.count))], at: position)
                }
                if bytes.isEmpty { bytes = [0] }
            }
            if (try? CloudEventJSON.decodeBatch(bytes)) != nil { decoded += 1 }
        }
        #expect(decoded < 20_000)
    }
}

@Suite("Event registry and ids")
struct EventRegistryTests {
    static func registry() throws -> EventRegistry {
        let registry = EventRegistry()
        try registry.register(Greeting.self)
        return registry
    }

    struct Impostor: Event {
        static let eventType = Greeting.eventType
    }

    @Test func decodesKnownTypesAndKeepsUnknownOnesRaw() throws {
        let registry = try Self.registry()
        let known = CloudEvent(
            source: "s", type: Greeting.eventType, data: .bytes(Array(#"{"text":"a","count":1}"#.utf8)))
        guard case .known(let value as Greeting, _) = try registry.decode(known) else {
            Issue.record("not decoded")
            return
        }
        #expect(value.text == "a")
        let unknown = CloudEvent(source: "s", type: "com.example.unknown", data: .bytes([1]))
        guard case .unknown(let raw) = try registry.decode(unknown) else {
            Issue.record("unknown type was not kept raw")
            return
        }
        #expect(raw.type == "com.example.unknown")
    }

    @Test func badDataForAKnownTypeIsATypedError() throws {
        let registry = try Self.registry()
        let event = CloudEvent(source: "s", type: Greeting.eventType, data: .bytes(Array(#"{"text":1}"#.utf8)))
        #expect {
            try registry.decode(event)
        } throws: { ($0 as? CloudEventError)?.code == .invalidData }
    }

    @Test func aSecondSwiftTypeCannotTakeATypeName() throws {
        let registry = try Self.registry()
        #expect(throws: RegistryError.self) { try registry.register(Impostor.self) }
        try registry.register(Greeting.self)
    }

    @Test func idsAreUUIDv7AndSortInCreationOrder() {
        let ids = (0..<10_000).map { _ in EventID() }
        #expect(ids == ids.sorted())
        #expect(Set(ids).count == ids.count)
        let text = ids[0].description
        #expect(text.count == 36)
        #expect(Array(text)[14] == "7")
        #expect("89ab".contains(Array(text)[19]))
        #expect(EventID(text) == ids[0])
        let milliseconds = ids[0].unixMilliseconds!
        let now = UInt64(Timestamp.now().nanosecondsSinceEpoch / 1_000_000)
        #expect(now >= milliseconds && now - milliseconds < 60_000)
    }
}
