import Foundation
import Herald
import HeraldBroker
import HeraldClient
import HeraldTesting
import HeraldWire
import NIOCore
import NIOPosix
import Testing

#if canImport(Glibc)
    import Glibc
#endif

/// A raw TCP client for tests that need to misbehave.
struct RawClient {
    let fd: Int32

    init(port: Int) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = UInt16(port).bigEndian
        let connected = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        try #require(connected == 0)
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }

    func send(_ bytes: [UInt8]) {
        _ = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
    }

    func send(_ message: Message, requestID: UInt32 = 0) {
        var buffer = ByteBuffer()
        message.write(requestID: requestID, to: &buffer)
        send(Array(buffer.readableBytesView))
    }

    /// Reads frames until the peer closes (or 5 s pass); returns them.
    func readUntilClosed() -> [Message] {
        var buffer = ByteBuffer()
        var chunk = [UInt8](repeating: 0, count: 4096)
        while true {
            let count = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
            if count <= 0 { break }
            buffer.writeBytes(chunk[0..<count])
        }
        var messages: [Message] = []
        while let frame = try? FrameDecoder(maxFrameSize: 1 << 24).next(&buffer),
            let message = try? Message(frame: frame)
        {
            messages.append(message)
        }
        return messages
    }

    func close() { Glibc.close(fd) }
}

@Suite("Connection limits")
struct ConnectionLimitTests {
    @Test func connectionsPastTheLimitAreRefusedWithARetryableError() async throws {
        let broker = try await TestBroker { $0.maxConnections = 1 }
        defer { Task { await broker.stop() } }
        let first = try RawClient(port: broker.port)
        defer { first.close() }
        first.send(.hello(Hello(client: "first")))
        try await Task.sleep(for: .milliseconds(100))
        let second = try RawClient(port: broker.port)
        defer { second.close() }
        let refused = second.readUntilClosed()
        guard case .error(let error)? = refused.first else {
            Issue.record("the second connection gets an error frame, got \(refused)")
            return
        }
        #expect(error.code == .unavailable && error.isRetryable)
    }

    @Test func anOversizedFrameClosesTheConnectionWithoutBufferingIt() async throws {
        let broker = try await TestBroker { $0.maxFrameBytes = 64 << 10 }
        defer { Task { await broker.stop() } }
        let client = try RawClient(port: broker.port)
        defer { client.close() }
        client.send(.hello(Hello(client: "big")))
        // Announce a 100 MiB frame and send only its header.
        client.send([0x06, 0x40, 0x00, 0x00, 10, 0, 0, 0, 1])
        let replies = client.readUntilClosed()
        #expect(replies.contains { if case .welcome = $0 { true } else { false } })
        #expect(replies.contains { if case .error(let error) = $0 { error.code == .frameTooLarge } else { false } })
    }

    @Test func aPublishBeforeTheHandshakeIsRefused() async throws {
        let broker = try await TestBroker()
        defer { Task { await broker.stop() } }
        let client = try RawClient(port: broker.port)
        defer { client.close() }
        client.send(.publish(topic: "t", events: []), requestID: 1)
        let replies = client.readUntilClosed()
        #expect(replies.contains { if case .error(let error) = $0 { error.code == .unexpectedFrame } else { false } })
        #expect(broker.broker.topic("t") == nil)
    }
}

@Suite("Client transport")
struct ClientTransportTests {
    @Test func requestsToAnUnreachableBrokerFailInsteadOfWaitingForever() async throws {
        let transport = BrokerTransport(
            configuration: BrokerTransport.Configuration(
                port: BrokerProcess.freePort(), reconnectDelay: (.milliseconds(20), .milliseconds(50)),
                unreachableTimeout: .milliseconds(300)))
        defer { Task { await transport.shutdown() } }
        let clock = ContinuousClock()
        let start = clock.now
        do {
            _ = try await transport.publish([sampleEvent(1)], to: "t")
            Issue.record("a publish to nowhere cannot succeed")
        } catch let error as TransportError {
            #expect(error.code == .unavailable)
            #expect(error.message.contains("unreachable"))
        }
        #expect(clock.now - start < .seconds(5))
        await #expect(throws: TransportError.self) {
            _ = try await transport.subscribe(topic: "t", group: "g", options: SubscribeOptions())
        }
    }

    @Test func publishesWaitForABrokerThatComesUpInTime() async throws {
        let port = BrokerProcess.freePort()
        let transport = BrokerTransport(
            configuration: BrokerTransport.Configuration(
                port: port, reconnectDelay: (.milliseconds(20), .milliseconds(50)), unreachableTimeout: .seconds(20)))
        defer { Task { await transport.shutdown() } }
        let publish = Task { try await transport.publish([sampleEvent(1)], to: "late") }
        try await Task.sleep(for: .milliseconds(300))
        let broker = try await TestBroker(port: port)
        defer { Task { await broker.stop() } }
        let acks = try await publish.value
        #expect(acks.count == 1 && !acks[0].duplicate)
    }
}

@Suite("Client transport batches")
struct ClientBatchTests {
    @Test func aBatchLargerThanAFrameIsSplitAndAcknowledgedInOrder() async throws {
        let broker = try await TestBroker { $0.fsync = .none }
        defer { Task { await broker.stop() } }
        let transport = broker.transport()
        defer { Task { await transport.shutdown() } }
        // 6,000 events of 2 KB: 12 MB, over the 8 MiB frame limit.
        let events = (0..<6000).map { index -> CloudEvent in
            var event = CloudEvent(
                source: "big", type: "com.example.big", data: .bytes(Array(repeating: 1, count: 2048)))
            event.partitionkey = "k\(index % 3)"
            return event
        }
        let acks = try await transport.publish(events, to: "big")
        #expect(acks.map(\.id) == events.map(\.id))
        #expect(acks.allSatisfy { !$0.duplicate })
        #expect(broker.broker.topic("big")!.endOffsets.reduce(0, +) == 6000)
        // Over the broker's 1 MiB event limit: refused by the broker, with the reason.
        let tooBig = CloudEvent(
            source: "big", type: "com.example.big", data: .bytes(Array(repeating: 1, count: 2 << 20)))
        do {
            _ = try await transport.publish([tooBig], to: "big")
            Issue.record("a 2 MiB event is refused")
        } catch let error as TransportError {
            #expect(error.code == .invalidRequest && error.message.contains("over the limit"))
        }
        // Over any frame: refused by the client.
        let huge = CloudEvent(source: "big", type: "com.example.big", data: .bytes(Array(repeating: 1, count: 9 << 20)))
        await #expect(throws: TransportError.self) { _ = try await transport.publish([huge], to: "big") }
        #expect(broker.broker.topic("big")!.endOffsets.reduce(0, +) == 6000)
    }
}

@Suite("A broker that closes every connection")
struct ClosingBrokerTests {
    /// Closes each connection as soon as it is accepted (as a broker refusing TLS or a credential does, fast).
    final class CloseAtOnce: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        func channelActive(context: ChannelHandlerContext) { context.close(promise: nil) }
    }

    /// The close can win the race with the client's connect completing; requests then waited forever (seen as a
    /// stalled TLS test). Many clients and many attempts each make that interleaving all but certain.
    @Test func requestsFailAfterTheUnreachableTimeoutHoweverTheCloseRaces() async throws {
        let server = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(CloseAtOnce()) }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        defer { server.close(promise: nil) }
        let port = try #require(server.localAddress?.port)
        try await withDeadline(.seconds(60), name: "every request fails") {
            try await withThrowingTaskGroup(of: Void.self) { group in
                for client in 0..<16 {
                    group.addTask {
                        let transport = BrokerTransport(
                            configuration: .init(
                                port: port, clientName: "c\(client)",
                                reconnectDelay: (.milliseconds(1), .milliseconds(5)),
                                unreachableTimeout: .milliseconds(300)))
                        for _ in 0..<3 {
                            do {
                                _ = try await transport.publish([sampleEvent(client)], to: "closing")
                                Issue.record("a broker that closes every connection acknowledged a publish")
                            } catch let error as TransportError {
                                #expect(error.code == .unavailable)
                            }
                        }
                        await transport.shutdown()
                    }
                }
                try await group.waitForAll()
            }
        }
    }
}

@Suite("Broker restarts")
struct BrokerRestartTests {
    @Test func stoppingTheServerClosesClientConnectionsSoTheyReconnect() async throws {
        let port = BrokerProcess.freePort()
        let first = try await TestBroker(port: port)
        let transport = first.transport()
        defer { Task { await transport.shutdown() } }
        _ = try await transport.publish([sampleEvent(1)], to: "moves")
        await first.stop()
        let second = try await TestBroker(port: port)
        defer { Task { await second.stop() } }
        let acks = try await transport.publish([sampleEvent(2)], to: "moves")
        #expect(acks.count == 1)
        #expect(second.broker.topic("moves")?.endOffsets.reduce(0, +) == 1, "the publish reached the new broker")
    }
}
