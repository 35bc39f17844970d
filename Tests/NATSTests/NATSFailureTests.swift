import Foundation
import Herald
import HeraldNATS
import HeraldTesting
import Synchronization
import Testing

#if canImport(Glibc)
    import Glibc
#endif

@Suite("NATS: crashes and credentials", .timeLimit(.minutes(3)))
struct NATSFailureTests {
    /// kill -9 the server in the middle of an acknowledged workload and start it again on the same store: every
    /// event whose publish was acknowledged is there, publishing resumes after the reconnect, and a consumer
    /// group reads everything.
    @Test func noAcknowledgedEventIsLostWhenTheServerIsKilled() async throws {
        let port = NATSServerProcess.freePort()
        let first = try NATSServerProcess(port: port, keepsDirectory: true)
        try await first.start()
        let directory = first.directory
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let transport = NATSTransport(configuration: .init(servers: [first.server]))
        let acknowledged = Mutex<Set<EventID>>([])
        let publisher = Task {
            for index in 0..<300 {
                var event = CloudEvent(
                    source: "crash", type: "com.herald.test.crash", data: .bytes(Array("\(index)".utf8)))
                event.partitionkey = "key-\(index % 5)"
                do {
                    _ = try await transport.publish([event], to: "crash")
                    _ = acknowledged.withLock { $0.insert(event.id) }
                } catch {
                    // Unacknowledged (the server was down too long): nothing is promised for it.
                }
            }
        }
        while acknowledged.withLock({ $0.count }) < 100 { try await Task.sleep(for: .milliseconds(5)) }
        first.stop(kill: SIGKILL)
        let second = try NATSServerProcess(port: port, directory: directory, keepsDirectory: true)
        try await second.start()
        defer { second.stop() }
        let beforeRestart = acknowledged.withLock { $0.count }
        await publisher.value
        let acked = acknowledged.withLock { $0 }
        #expect(beforeRestart < 300, "the kill happened mid-workload (\(beforeRestart) acknowledged by then)")
        #expect(acked.count > beforeRestart, "publishing resumed after the restart (\(acked.count) acknowledged)")

        let stream = try await transport.subscribe(
            topic: "crash", group: "reader", options: SubscribeOptions(ackWait: .seconds(10), maxInFlight: 512))
        var seen = Set<EventID>()
        var iterator = stream.makeAsyncIterator()
        while !acked.isSubset(of: seen),
            let delivery = try await TransportConformance.nextWithin(&iterator, .seconds(5))
        {
            seen.insert(delivery.event.id)
            try await delivery.ack()
        }
        #expect(acked.subtracting(seen).isEmpty, "\(acked.subtracting(seen).count) acknowledged events lost")
        await transport.shutdown()
    }

    /// Token and user/password authentication: the right credential connects, a wrong one is refused with the
    /// server's reason instead of hanging.
    @Test func credentialsAreSentAndAWrongOneIsRefused() async throws {
        let tokenServer = try NATSServerProcess(extraConfig: "authorization { token: \"s3cret\" }")
        try await tokenServer.start()
        defer { tokenServer.stop() }
        let good = NATSTransport(configuration: .init(servers: [tokenServer.server], token: "s3cret"))
        #expect(try await good.publish([CloudEvent(source: "auth", type: "t")], to: "auth").count == 1)
        await good.shutdown()
        let wrong = NATSTransport(configuration: .init(servers: [tokenServer.server], token: "forged"))
        do {
            _ = try await wrong.publish([CloudEvent(source: "auth", type: "t")], to: "auth")
            Issue.record("a forged token was accepted")
        } catch let error as TransportError {
            #expect(error.code == .unavailable && error.message.contains("Authorization"), "\(error)")
        }
        await wrong.shutdown()

        let userServer = try NATSServerProcess(
            extraConfig: "authorization { users: [ { user: \"herald\", password: \"pw\" } ] }")
        try await userServer.start()
        defer { userServer.stop() }
        let user = NATSTransport(configuration: .init(servers: [userServer.server], user: "herald", password: "pw"))
        #expect(try await user.publish([CloudEvent(source: "auth", type: "t")], to: "auth").count == 1)
        await user.shutdown()
        let nobody = NATSTransport(configuration: .init(servers: [userServer.server], user: "herald", password: "no"))
        await #expect(throws: TransportError.self) {
            _ = try await nobody.publish([CloudEvent(source: "auth", type: "t")], to: "auth")
        }
        await nobody.shutdown()
    }
}
