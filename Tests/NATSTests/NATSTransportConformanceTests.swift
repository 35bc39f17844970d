import Foundation
import Herald
import HeraldNATS
import HeraldTesting
import Testing

/// `NATSTransport` passes the same conformance suite as the in-memory transport and the Herald broker, against a
/// real nats-server with JetStream (file storage, fsync on every write): the one scripts/test started
/// (HERALD_NATS_URL), or one of its own when run alone.
@Suite("Transport conformance: NATS JetStream", .timeLimit(.minutes(3)))
struct NATSTransportConformanceTests {
    @Test(arguments: TransportConformance.checks)
    func conformance(_ check: TransportConformance.Check) async throws {
        try await withNATSServer { servers in
            try await check.run { NATSTransport(configuration: .init(servers: servers)) }
        }
    }
}

/// Runs `body` with the servers of the NATS scripts/test started (HERALD_NATS_URL), or with a server of its own.
func withNATSServer(_ body: ([NATSConnection.Server]) async throws -> Void) async throws {
    if let url = ProcessInfo.processInfo.environment["HERALD_NATS_URL"],
        let configuration = NATSTransport.Configuration(url: url)
    {
        return try await body(configuration.servers)
    }
    let server = try NATSServerProcess()
    try await server.start()
    defer { server.stop() }
    try await body([server.server])
}
