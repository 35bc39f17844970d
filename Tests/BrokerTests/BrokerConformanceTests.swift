import Herald
import HeraldTesting
import Testing

@Suite("Transport conformance: Herald broker over TCP")
struct BrokerConformanceTests {
    @Test(arguments: TransportConformance.checks)
    func conformance(_ check: TransportConformance.Check) async throws {
        let broker = try await TestBroker()
        defer { Task { await broker.stop() } }
        try await check.run { broker.transport() }
    }
}
