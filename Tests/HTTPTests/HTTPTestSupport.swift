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

/// Raw bytes to a port and whatever comes back until `done` says so, the peer closes, or `timeout` passes: for
/// requests no well-behaved client would send, a Server-Sent Events stream, and wire-level handshakes.
func rawExchange(
    port: Int, send: [UInt8], until done: @escaping @Sendable (String) -> Bool, timeout: Duration = .seconds(5)
) async throws -> String {
    String(
        decoding: try await rawBytesExchange(
            port: port, send: send, until: { done(String(decoding: $0, as: UTF8.self)) }, timeout: timeout),
        as: UTF8.self)
}

func rawBytesExchange(
    port: Int, send: [UInt8], until done: @escaping @Sendable ([UInt8]) -> Bool, timeout: Duration = .seconds(5),
    then followUp: (send: [UInt8], until: @Sendable ([UInt8]) -> Bool)? = nil
) async throws -> [UInt8] {
    let stage = Atomic<Int>(0)
    let followUpDone = followUp?.until
    let state = Mutex<(bytes: [UInt8], finished: Bool, waiter: CheckedContinuation<Void, Never>?)>(([], false, nil))
    let finish: @Sendable () -> Void = {
        let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
            state.finished = true
            defer { state.waiter = nil }
            return state.waiter
        }
        waiter?.resume()
    }
    final class Reader: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        let onBytes: @Sendable ([UInt8]) -> Void
        let onClose: @Sendable () -> Void
        init(onBytes: @escaping @Sendable ([UInt8]) -> Void, onClose: @escaping @Sendable () -> Void) {
            self.onBytes = onBytes
            self.onClose = onClose
        }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            let buffer = unwrapInboundIn(data)
            onBytes(Array(buffer.readableBytesView))
        }
        func channelInactive(context: ChannelHandlerContext) { onClose() }
    }
    let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
        .channelInitializer { channel in
            channel.eventLoop.makeCompletedFuture {
                try channel.pipeline.syncOperations.addHandler(
                    Reader(
                        onBytes: { bytes in
                            let all = state.withLock { state in
                                state.bytes += bytes
                                return state.bytes
                            }
                            if stage.load(ordering: .relaxed) == 0 ? done(all) : (followUpDone?(all) ?? true) {
                                finish()
                            }
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
        let finished = state.withLock { state -> Bool in
            if state.finished { return true }
            state.waiter = continuation
            return false
        }
        if finished { continuation.resume() }
    }
    if let followUp, channel.isActive {
        let proceed = state.withLock { state in
            state.finished = false
            return done(state.bytes)
        }
        if proceed {
            stage.store(1, ordering: .relaxed)
            try? await channel.writeAndFlush(ByteBuffer(bytes: followUp.send))
            await withCheckedContinuation { continuation in
                let finished = state.withLock { state -> Bool in
                    if state.finished || followUp.until(state.bytes) || !channel.isActive { return true }
                    state.waiter = continuation
                    return false
                }
                if finished { continuation.resume() }
            }
        }
    }
    timer.cancel()
    try? await channel.close()
    return state.withLock { $0.bytes }
}
