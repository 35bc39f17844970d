import Foundation
import Herald
import HeraldBroker
import HeraldWire
import NIOCore
import Testing

#if canImport(Glibc)
    import Glibc
#endif

@Suite("Slow consumers")
struct SlowConsumerTests {
    /// A subscriber that asks for unlimited credit and then never reads its socket: the broker stops writing to it
    /// once its outbound buffer is full, so what it holds for that connection stays bounded while the rest waits
    /// in the log.
    @Test func aConsumerThatStopsReadingIsPausedNotBuffered() async throws {
        let broker = try await TestBroker {
            $0.maxOutboundBytesPerConnection = 256 << 10
            $0.fsync = .none
        }
        defer { Task { await broker.stop() } }
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = UInt16(broker.port).bigEndian
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        try #require(connected == 0)
        var buffer = ByteBuffer()
        Message.hello(Hello(client: "slow")).write(requestID: 0, to: &buffer)
        Message.subscribe(
            SubscribeRequest(
                topic: "flood", group: "slow", start: .earliest, ackWaitMilliseconds: 600_000, maxDeliveries: 5,
                backoffMilliseconds: [], ordered: false, maxInFlight: 10_000_000)
        ).write(requestID: 0x8000_0001, to: &buffer)
        let bytes = Array(buffer.readableBytesView)
        #expect(bytes.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, 0) } == bytes.count)

        let total = 40_000
        let payload = [UInt8](repeating: 7, count: 1000)
        for start in stride(from: 0, to: total, by: 1000) {
            let events = (start..<(start + 1000)).map { _ in
                try! BinaryEvent.encode(CloudEvent(source: "flood", type: "com.example.flood", data: .bytes(payload)))
            }
            _ = try await broker.broker.publish(topic: "flood", events: events)
        }
        try await Task.sleep(for: .milliseconds(500))
        let held = broker.broker.inFlight(topic: "flood", group: "slow")
        #expect(held > 0, "the consumer got what its buffers hold")
        #expect(held < total / 2, "the broker stopped at the full buffer: \(held) of \(total) handed out")
        let lag = broker.broker.groups(topic: "flood")[0].lag
        #expect(Int(lag) == total - held, "the rest waits in the log")
    }
}
