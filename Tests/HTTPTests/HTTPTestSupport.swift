import Foundation
import Herald
import HeraldAuth
import HeraldBroker
import HeraldHTTP
import NIOCore
import NIOPosix
import NIOSSL
import Synchronization

/// A broker with its TCP and HTTP servers on ephemeral ports and a fresh data directory.
final class HTTPTestBroker: Sendable {
    let directory: String
    let broker: Broker
    let tcp: BrokerServer
    let http: HTTPServer
    let tcpPort: Int
    let httpPort: Int
    let tasks: [Task<Void, Never>]
    let client: HTTPClient
    let scheme: String

    init(
        authenticator: Authenticator? = nil, tls: TLSConfiguration? = nil, clientTLS: TLSConfiguration? = nil,
        limits: HTTPLimits = HTTPLimits(), configure: (inout BrokerConfiguration) -> Void = { _ in }
    ) async throws {
        directory = NSTemporaryDirectory() + "herald-http-test-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        var configuration = BrokerConfiguration(dataDirectory: directory)
        configuration.tick = .milliseconds(5)
        configure(&configuration)
        broker = try Broker(configuration: configuration)
        tcp = BrokerServer(
            broker: broker, port: 0, authenticator: authenticator,
            tls: try tls.map { try NIOSSLContext(configuration: $0) })
        tcpPort = try await tcp.start()
        http = HTTPServer(broker: broker, port: 0, authenticator: authenticator, tls: tls, limits: limits)
        let broker = self.broker
        let http = self.http
        tasks = [
            Task {
                while !Task.isCancelled {
                    broker.tick()
                    try? await Task.sleep(for: .milliseconds(5))
                }
            },
            Task { try? await http.run() },
        ]
        httpPort = await http.boundPort()
        client = HTTPClient(tls: clientTLS)
        scheme = tls == nil ? "http" : "https"
    }

    var base: String { "\(scheme)://127.0.0.1:\(httpPort)" }

    func request(
        _ method: String, _ path: String, json: String? = nil, headers: [(name: String, value: String)] = [],
        body: [UInt8]? = nil
    ) async throws -> HTTPClient.Response {
        var allHeaders = headers
        if json != nil { allHeaders.append(("content-type", "application/json")) }
        return try await client.request(
            method, base + path, headers: allHeaders, body: body ?? json.map { Array($0.utf8) } ?? [])
    }

    func stop() async {
        for task in tasks { task.cancel() }
        client.shutdown()
        await tcp.stop()
        try? await Task.sleep(for: .milliseconds(50))
        broker.close()
    }
}

extension HTTPClient.Response {
    var text: String { String(decoding: body, as: UTF8.self) }

    func json() throws -> [String: Any] {
        try JSONSerialization.jsonObject(with: Data(body)) as? [String: Any] ?? [:]
    }
}

/// Raw bytes to a port and whatever comes back until the peer closes or `timeout` passes: for requests no
/// well-behaved client would send, and for reading a Server-Sent Events stream.
func rawExchange(
    port: Int, send: [UInt8], until done: @escaping @Sendable (String) -> Bool, timeout: Duration = .seconds(5)
)
    async throws -> String
{
    let received = Mutex("")
    let finished = Mutex<CheckedContinuation<Void, Never>?>(nil)
    final class Reader: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        let onBytes: @Sendable (String) -> Void
        let onClose: @Sendable () -> Void
        init(onBytes: @escaping @Sendable (String) -> Void, onClose: @escaping @Sendable () -> Void) {
            self.onBytes = onBytes
            self.onClose = onClose
        }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let buffer = unwrapInboundIn(data)
            onBytes(String(buffer: buffer))
        }
        func channelInactive(context: ChannelHandlerContext) { onClose() }
    }
    let finish: @Sendable () -> Void = {
        finished.withLock {
            $0?.resume(); $0 = nil
        }
    }
    let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
        .channelInitializer { channel in
            channel.eventLoop.makeCompletedFuture {
                try channel.pipeline.syncOperations.addHandler(
                    Reader(
                        onBytes: { text in
                            let all = received.withLock {
                                $0 += text; return $0
                            }
                            if done(all) { finish() }
                        }, onClose: finish))
            }
        }
        .connect(host: "127.0.0.1", port: port).get()
    try await channel.writeAndFlush(ByteBuffer(bytes: send))
    let timer = Task {
        try? await Task.sleep(for: timeout)
        finish()
    }
    await withCheckedContinuation { continuation in
        let ready = received.withLock { done($0) } || !channel.isActive
        if ready {
            continuation.resume()
        } else {
            finished.withLock { $0 = continuation }
            if received.withLock({ done($0) }) { finish() }
        }
    }
    timer.cancel()
    try? await channel.close()
    return received.withLock { $0 }
}
