import Foundation
import Herald
import HeraldNATS
import HeraldTesting
import NIOSSL
import Testing

@Suite("NATS: TLS", .timeLimit(.minutes(2)))
struct NATSTLSTests {
    static var certificates: String { testCertificateDirectory }

    static func client(trusting ca: String) -> TLSConfiguration {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.trustRoots = .file(certificates + "/" + ca)
        return configuration
    }

    @Test func theTransportUpgradesToTLSAndRefusesWhatItCannotTrust() async throws {
        let directory = Self.certificates
        let server = try NATSServerProcess(
            extraConfig: "tls { cert_file: \"\(directory)/server.pem\", key_file: \"\(directory)/server.key\" }")
        try await server.start()
        defer { server.stop() }

        let secure = NATSTransport(configuration: .init(servers: [server.server], tls: Self.client(trusting: "ca.pem")))
        #expect(try await secure.publish([CloudEvent(source: "tls", type: "t")], to: "tls").count == 1)
        let stream = try await secure.subscribe(topic: "tls", group: "g", options: SubscribeOptions())
        var iterator = stream.makeAsyncIterator()
        try await iterator.next()?.ack()
        await secure.shutdown()

        let plain = NATSTransport(configuration: .init(servers: [server.server]))
        do {
            _ = try await plain.publish([CloudEvent(source: "tls", type: "t")], to: "tls")
            Issue.record("a client without TLS was served by a server that requires it")
        } catch let error as TransportError {
            #expect(error.message.contains("requires TLS"), "\(error)")
        }
        await plain.shutdown()

        let untrusting = NATSTransport(
            configuration: .init(servers: [server.server], tls: Self.client(trusting: "other-ca.pem")))
        await #expect(throws: TransportError.self) {
            _ = try await untrusting.publish([CloudEvent(source: "tls", type: "t")], to: "tls")
        }
        await untrusting.shutdown()
    }
}
