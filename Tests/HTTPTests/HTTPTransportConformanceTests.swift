import Herald
import HeraldHTTP
import HeraldTesting
import Testing

/// The transport that speaks only the public HTTP API (publish in batch mode, receive through a push group)
/// passes the same conformance suite as the in-memory transport and the TCP client.
@Suite("Transport conformance: Herald broker over HTTP (push groups)", .timeLimit(.minutes(2)))
struct HTTPTransportConformanceTests {
    @Test(arguments: TransportConformance.checks)
    func conformance(_ check: TransportConformance.Check) async throws {
        let server = try await HTTPTestBroker()
        defer { Task { await server.stop() } }
        let base = server.base
        try await check.run { HTTPTransport(configuration: .init(broker: base)) }
    }
}
