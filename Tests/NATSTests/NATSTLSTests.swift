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

    /// Mutual TLS: a server that verifies client certificates serves a client presenting one signed by its CA and
    /// refuses a client without one.
    @Test func aServerThatVerifiesClientsServesOnlyClientsWithACertificate() async throws {
        let directory = Self.certificates
        let server = try NATSServerProcess(
            extraConfig: """
                tls { cert_file: "\(directory)/server.pem", key_file: "\(directory)/server.key", \
                ca_file: "\(directory)/ca.pem", verify: true }
                """)
        try await server.start()
        defer { server.stop() }

        var mutual = Self.client(trusting: "ca.pem")
        mutual.certificateChain = try NIOSSLCertificate.fromPEMFile(directory + "/client.pem").map { .certificate($0) }
        mutual.privateKey = .privateKey(try NIOSSLPrivateKey(file: directory + "/client.key", format: .pem))
        let identified = NATSTransport(configuration: .init(servers: [server.server], tls: mutual))
        #expect(try await identified.publish([CloudEvent(source: "mtls", type: "t")], to: "mtls").count == 1)
        await identified.shutdown()

        let anonymous = NATSTransport(
            configuration: .init(servers: [server.server], tls: Self.client(trusting: "ca.pem")))
        await #expect(throws: TransportError.self) {
            _ = try await anonymous.publish([CloudEvent(source: "mtls", type: "t")], to: "mtls")
        }
        await anonymous.shutdown()
    }
}
