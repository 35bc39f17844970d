import Crypto
import Foundation
import Herald
import HeraldBroker
import HeraldClient
import HeraldEncryption
import HeraldWire
import Testing

@Suite("Payload encryption", .timeLimit(.minutes(2))) struct EncryptionTests {
    static func key() -> [UInt8] { (0..<32).map { _ in UInt8.random(in: 0...255) } }

    static func files(under directory: String) -> [String] {
        let enumerator = FileManager.default.enumerator(atPath: directory)
        var paths: [String] = []
        while let next = enumerator?.nextObject() as? String { paths.append(directory + "/" + next) }
        return paths
    }

    static func contains(_ needle: [UInt8], in path: String) -> Bool {
        guard let data = FileManager.default.contents(atPath: path), data.count >= needle.count else { return false }
        let bytes = [UInt8](data)
        for start in 0...(bytes.count - needle.count) where bytes[start] == needle[0] {
            if bytes[start..<start + needle.count].elementsEqual(needle) { return true }
        }
        return false
    }

    @Test func theBrokerAndItsLogNeverSeePlaintextAndOldKeysStillOpen() async throws {
        let server = try await HTTPTestBroker()
        defer { Task { await server.stop() } }
        let (k1, k2) = (Self.key(), Self.key())
        let producer = EncryptingTransport(
            wrapping: BrokerTransport(host: "127.0.0.1", port: server.tcpPort, clientName: "enc"),
            keys: try KeyRing(current: "k1", keys: ["k1": k1]))
        let canary = "CANARY-\(UUID().uuidString)"
        var events: [CloudEvent] = []
        for index in 0..<3 {
            var event = CloudEvent(source: "/enc", type: "secret", data: .bytes(Array("\(canary) #\(index)".utf8)))
            event.datacontenttype = "text/plain"
            events.append(event)
        }
        _ = try await producer.publish(Array(events.prefix(2)), to: "vault")
        // Rotate: the third is sealed with k2; a consumer holding both keys opens all three.
        try producer.rotate(to: "k2", key: k2)
        _ = try await producer.publish([events[2]], to: "vault")

        let files = Self.files(under: server.directory)
        #expect(files.contains { $0.hasSuffix(".log") })
        #expect(!files.contains { Self.contains(Array(canary.utf8), in: $0) }, "no plaintext on the broker's disk")

        // What the broker stores and serves over HTTP is ciphertext with the key id in clear.
        let pulled = try await server.request(
            "POST", "/v1/topics/vault/groups/http/pull", json: #"{"max":3,"waitMs":2000}"#)
        #expect(!pulled.text.contains(canary))
        #expect(pulled.text.contains(#""enckeyid":"k1""#) && pulled.text.contains(#""enckeyid":"k2""#))

        let consumer = EncryptingTransport(
            wrapping: BrokerTransport(host: "127.0.0.1", port: server.tcpPort, clientName: "dec"),
            keys: try KeyRing(current: "k2", keys: ["k1": k1, "k2": k2]))
        var opened: [String] = []
        for try await delivery in try await consumer.subscribe(
            topic: "vault", group: "svc", options: SubscribeOptions())
        {
            guard case .bytes(let bytes) = delivery.event.data else { break }
            opened.append(String(decoding: bytes, as: UTF8.self))
            #expect(delivery.event.datacontenttype == "text/plain", "the original content type is restored")
            #expect(delivery.event[extension: "enckeyid"] == nil)
            try await delivery.ack()
            if opened.count == 3 { break }
        }
        #expect(Set(opened) == Set((0..<3).map { "\(canary) #\($0)" }))
        await producer.shutdown()
        await consumer.shutdown()
    }

    @Test func tamperedOrUnknownKeyPayloadsAreDeadLetteredNotHandled() async throws {
        let server = try await HTTPTestBroker()
        defer { Task { await server.stop() } }
        let key = Self.key()
        let ring = try KeyRing(current: "k1", keys: ["k1": key])
        let raw = BrokerTransport(host: "127.0.0.1", port: server.tcpPort, clientName: "raw")
        var good = CloudEvent(id: EventID("good"), source: "/enc", type: "secret", data: .bytes(Array("fine".utf8)))
        good = try EncryptingTransport.seal(good, with: ring)
        var tampered = try EncryptingTransport.seal(
            CloudEvent(id: EventID("tampered"), source: "/enc", type: "secret", data: .bytes(Array("x".utf8))),
            with: ring)
        if case .bytes(var bytes) = tampered.data {
            bytes[bytes.count - 1] ^= 0x01
            tampered.data = .bytes(bytes)
        }
        var moved = good
        moved.id = EventID("moved")  // the same ciphertext under another id: the associated data no longer matches
        let other = try EncryptingTransport.seal(
            CloudEvent(id: EventID("other-key"), source: "/enc", type: "secret", data: .bytes(Array("y".utf8))),
            with: try KeyRing(current: "k9", keys: ["k9": Self.key()]))
        _ = try await raw.publish([tampered, moved, other, good], to: "vault")

        let consumer = EncryptingTransport(
            wrapping: BrokerTransport(host: "127.0.0.1", port: server.tcpPort, clientName: "dec"), keys: ring)
        var handled: [String] = []
        for try await delivery in try await consumer.subscribe(
            topic: "vault", group: "svc", options: SubscribeOptions())
        {
            handled.append(delivery.event.id.description)
            try await delivery.ack()
            break
        }
        #expect(handled == ["good"], "only the intact event reaches the handler")
        var letters: [CloudEvent] = []
        for _ in 0..<200 where letters.count < 3 {
            letters = try server.broker.deadLetters(topic: "vault")
            try await Task.sleep(for: .milliseconds(20))
        }
        #expect(Set(letters.map(\.id.description)) == ["tampered", "moved", "other-key"])
        #expect(letters.allSatisfy { "\($0[extension: "deadletterreason"] ?? .string(""))".contains("decrypted") })
        await raw.shutdown()
        await consumer.shutdown()
    }
}
