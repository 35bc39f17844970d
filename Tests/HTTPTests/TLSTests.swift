import Foundation
import Herald
import HeraldClient
import HeraldHTTP
import HeraldTesting
import NIOSSL
import Testing

/// Certificates made by scripts/gen-test-certs (scripts/test passes their directory in HERALD_TEST_CERTS; run
/// alone, the test makes its own).
enum TestCertificates {
    static var directory: String { testCertificateDirectory }

    static func path(_ name: String) -> String { directory + "/" + name }

    static func server(mutual: Bool = false) throws -> TLSConfiguration {
        var configuration = TLSConfiguration.makeServerConfiguration(
            certificateChain: try NIOSSLCertificate.fromPEMFile(path("server.pem")).map { .certificate($0) },
            privateKey: .privateKey(try NIOSSLPrivateKey(file: path("server.key"), format: .pem)))
        if mutual {
            configuration.trustRoots = .file(path("ca.pem"))
            configuration.certificateVerification = .noHostnameVerification
        }
        return configuration
    }

    static func client(trusting ca: String = "ca.pem", withCertificate: Bool = false) throws -> TLSConfiguration {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.trustRoots = .file(path(ca))
        if withCertificate {
            configuration.certificateChain = try NIOSSLCertificate.fromPEMFile(path("client.pem")).map {
                .certificate($0)
            }
            configuration.privateKey = .privateKey(try NIOSSLPrivateKey(file: path("client.key"), format: .pem))
        }
        return configuration
    }
}

@Suite("TLS", .timeLimit(.minutes(2))) struct TLSTests {
    @Test func tcpAndHTTPServeOverTLSAndRefuseUntrustedPeers() async throws {
        let server = try await HTTPTestBroker(
            tls: try TestCertificates.server(), clientTLS: try TestCertificates.client())
        defer { Task { await server.stop() } }
        let health = try await server.request("GET", "/healthz")
        #expect(health.status == 200)
        let published = try await server.request(
            "POST", "/v1/topics/secure/events",
            headers: [("ce-specversion", "1.0"), ("ce-id", "1"), ("ce-source", "/tls"), ("ce-type", "t")])
        #expect(published.status == 200)

        // A client that does not trust the server's CA fails the handshake.
        let untrusting = HTTPClient(tls: try TestCertificates.client(trusting: "other-ca.pem"))
        await #expect(throws: (any Error).self) { _ = try await untrusting.request("GET", server.base + "/healthz") }
        // Plain HTTP to the TLS port gets no HTTP answer.
        let plain = try await rawExchange(
            port: server.httpPort, send: Array("GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n".utf8), until: { _ in false },
            timeout: .seconds(1))
        #expect(!plain.contains("200 OK"))

        // The TCP protocol over TLS.
        let transport = BrokerTransport(
            configuration: .init(
                port: server.tcpPort, clientName: "tls", unreachableTimeout: .seconds(5),
                tls: try TestCertificates.client()))
        let acks = try await transport.publish([CloudEvent(source: "/tls", type: "t")], to: "secure")
        #expect(acks.count == 1)
        await transport.shutdown()
        let wrongCA = BrokerTransport(
            configuration: .init(
                port: server.tcpPort, clientName: "tls", unreachableTimeout: .seconds(1),
                tls: try TestCertificates.client(trusting: "other-ca.pem")))
        await #expect(throws: (any Error).self) {
            _ = try await wrongCA.publish([CloudEvent(source: "/tls", type: "t")], to: "secure")
        }
        await wrongCA.shutdown()
    }

    @Test func mutualTLSRequiresAClientCertificateFromTheCA() async throws {
        let server = try await HTTPTestBroker(
            tls: try TestCertificates.server(mutual: true),
            clientTLS: try TestCertificates.client(withCertificate: true))
        defer { Task { await server.stop() } }
        #expect(try await server.request("GET", "/healthz").status == 200)
        let anonymous = HTTPClient(tls: try TestCertificates.client())
        await #expect(throws: (any Error).self) { _ = try await anonymous.request("GET", server.base + "/healthz") }
        let transport = BrokerTransport(
            configuration: .init(
                port: server.tcpPort, clientName: "mtls", unreachableTimeout: .seconds(5),
                tls: try TestCertificates.client(withCertificate: true)))
        #expect(try await transport.publish([CloudEvent(source: "/tls", type: "t")], to: "secure").count == 1)
        await transport.shutdown()
    }
}
