import Herald
import HeraldTesting
import Testing

@Suite("Transport conformance: in-memory")
struct InMemoryTransportConformanceTests {
    @Test(arguments: TransportConformance.checks)
    func conformance(_ check: TransportConformance.Check) async throws {
        try await check.run { InMemoryTransport() }
    }
}
