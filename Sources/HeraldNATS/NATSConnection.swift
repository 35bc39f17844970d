import Foundation
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import Synchronization

/// Errors of the NATS client.
public struct NATSError: Error, Hashable, Sendable, CustomStringConvertible {
    public enum Code: String, Sendable, Hashable {
        case connectionFailed, connectionLost, closed, timeout, noResponders, serverError, protocolError
    }
    public let code: Code
    public let message: String
    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }
    public var description: String { "NATS \(code.rawValue): \(message)" }
}

/// A connection to a NATS server (or one of several: a cluster) over SwiftNIO: the core protocol with headers,
/// token or user/password authentication, request/reply through one wildcard inbox subscription, and
/// reconnection with exponential backoff that subscribes again and then releases what waited meanwhile.
public final class NATSConnection: Sendable {
    public struct Server: Sendable, Hashable {
        public var host: String
        public var port: Int
        public init(host: String, port: Int) {
            self.host = host
            self.port = port
        }

        /// `nats://host:port` (or `host:port`).
        public init?(url: String) {
            var rest = Substring(url)
            if rest.hasPrefix("nats://") { rest = rest.dropFirst("nats://".count) }
            if let slash = rest.firstIndex(of: "/") { rest = rest[..<slash] }
            let parts = rest.split(separator: ":")
            guard parts.count <= 2, let host = parts.first, !host.isEmpty else { return nil }
            let port = parts.count == 2 ? Int(parts[1]) : 4222
            guard let port else { return nil }
            self.init(host: String(host), port: port)
        }
    }

    public struct Configuration: Sendable {
        public var servers: [Server]
        public var name: String
        public var token: String?
        public var user: String?
        public var password: String?
        /// First and largest delay between reconnect attempts.
        public var reconnectDelay: (first: Duration, max: Duration)
        /// How long an operation waits for a lost connection to come back before it fails.
        public var reconnectWait: Duration
        /// Upgrade to TLS after the server's INFO (as NATS does), verifying the server with these settings. A
        /// server that requires TLS (`tls_required` in its INFO) without this is refused.
        public var tls: TLSConfiguration?

        public init(
            servers: [Server], name: String = "herald", token: String? = nil, user: String? = nil,
            password: String? = nil,
            reconnectDelay: (first: Duration, max: Duration) = (.milliseconds(50), .seconds(2)),
            reconnectWait: Duration = .seconds(30), tls: TLSConfiguration? = nil
        ) {
            self.tls = tls
            self.servers = servers
            self.name = name
            self.token = token
            self.user = user
            self.password = password
            self.reconnectDelay = reconnectDelay
            self.reconnectWait = reconnectWait
        }
    }

    struct Subscription {
        let subject: String
        let queue: String?
        let handler: @Sendable (NATSMessage) -> Void
    }

    struct State {
        var channel: (any Channel)?
        var generation = 0
        var closed = false
        var subscriptions: [UInt64: Subscription] = [:]
        var nextSID: UInt64 = 1
        /// Operations waiting for a connection.
        var connectionWaiters: [UUID: CheckedContinuation<any Channel, any Error>] = [:]
        var pongWaiters: [CheckedContinuation<Void, any Error>] = []
        /// Replies awaited by `requests(_:timeout:)`, by reply subject.
        var slots: [String: ReplySlot] = [:]
        var nextRequest = 0
        var serverIndex = 0
        var reconnecting = false
        var info: String = ""
    }

    public let configuration: Configuration
    let state = Mutex(State())
    let logger: Logger
    let group: any EventLoopGroup
    /// Replies to requests come to `<inbox>.<n>`.
    let inbox = "_INBOX." + UUID().uuidString.replacingOccurrences(of: "-", with: "")
    static let inboxSID: UInt64 = 0

    public init(
        configuration: Configuration, group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        logger: Logger = Logger(label: "herald.nats")
    ) {
        self.configuration = configuration
        self.group = group
        self.logger = logger
    }

    /// Connects (the first server that answers); throws when none does.
    public func connect() async throws {
        var lastError: any Error = NATSError(.connectionFailed, "no servers configured")
        for _ in configuration.servers.indices {
            do {
                try await attempt()
                return
            } catch {
                lastError = error
                state.withLock { $0.serverIndex = ($0.serverIndex + 1) % max(1, configuration.servers.count) }
            }
        }
        throw lastError
    }

    /// The server's INFO of the current connection (JSON text).
    public var serverInfo: String { state.withLock { $0.info } }

    private func attempt() async throws {
        let (server, generation) = state.withLock { state -> (Server, Int) in
            state.generation += 1
            return (configuration.servers[state.serverIndex % configuration.servers.count], state.generation)
        }
        let handshake = Handshake()
        let tls = try configuration.tls.map { try NIOSSLContext(configuration: $0) }
        let channel = try await ClientBootstrap(group: group)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .connectTimeout(.seconds(5))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        NATSChannelHandler(
                            connection: self, generation: generation, handshake: handshake,
                            tls: tls.map {
                                (context: $0, serverName: server.host.isIPAddressLiteral ? nil : server.host)
                            }
                        ))
                }
            }
            .connect(host: server.host, port: server.port).get()
        do {
            try await withDeadline(.seconds(10)) {
                try await handshake.wait()
            } onTimeout: {
                handshake.finish(.failure(NATSError(.timeout, "no answer to CONNECT within 10 s")))
            }
        } catch {
            try? await channel.close()
            throw NATSError(.connectionFailed, "\(server.host):\(server.port): \(error)")
        }
        // Subscribe again (same sids), then let waiting operations through.
        var buffer = channel.allocator.buffer(capacity: 256)
        let waiters = state.withLock { state -> [CheckedContinuation<any Channel, any Error>] in
            for (sid, subscription) in state.subscriptions.sorted(by: { $0.key < $1.key }) {
                try? NATSClientOperation.subscribe(subject: subscription.subject, queue: subscription.queue, sid: sid)
                    .write(to: &buffer)
            }
            try? NATSClientOperation.subscribe(subject: inbox + ".*", queue: nil, sid: Self.inboxSID).write(to: &buffer)
            state.channel = channel
            state.reconnecting = false
            defer { state.connectionWaiters = [:] }
            return Array(state.connectionWaiters.values)
        }
        try? await channel.writeAndFlush(buffer)
        for waiter in waiters { waiter.resume(returning: channel) }
        // Closed before it was registered above: its `channelInactive` found nothing live to lose.
        if !channel.isActive { lost(generation: generation) }
    }

    func connectJSON() -> String {
        var fields: [String: Any] = [
            "verbose": false, "pedantic": false, "headers": true, "no_responders": true, "protocol": 1,
            "lang": "swift", "version": "1.0", "name": configuration.name,
            "tls_required": configuration.tls != nil,
        ]
        if let token = configuration.token { fields["auth_token"] = token }
        if let user = configuration.user { fields["user"] = user }
        if let password = configuration.password { fields["pass"] = password }
        let data = (try? JSONSerialization.data(withJSONObject: fields, options: [.sortedKeys])) ?? Data("{}".utf8)
        return String(decoding: data, as: UTF8.self)
    }

    // MARK: Operations

    /// The live channel, waiting (up to `reconnectWait`) while the connection is being re-established.
    func liveChannel() async throws -> any Channel {
        if let channel = try state.withLock({ state -> (any Channel)? in
            if state.closed { throw NATSError(.closed, "the connection is closed") }
            return state.channel
        }) {
            return channel
        }
        let id = UUID()
        return try await withDeadline(configuration.reconnectWait) {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<any Channel, any Error>) in
                let result = self.state.withLock { state -> Result<any Channel, any Error>? in
                    if state.closed { return .failure(NATSError(.closed, "the connection is closed")) }
                    if let channel = state.channel { return .success(channel) }
                    state.connectionWaiters[id] = continuation
                    return nil
                }
                if let result { continuation.resume(with: result) }
            }
        } onTimeout: {
            let waiter = self.state.withLock { $0.connectionWaiters.removeValue(forKey: id) }
            waiter?.resume(
                throwing: NATSError(.connectionLost, "not reconnected within \(self.configuration.reconnectWait)"))
        }
    }

    func send(_ operations: [NATSClientOperation]) async throws {
        let channel = try await liveChannel()
        var buffer = channel.allocator.buffer(capacity: 128)
        for operation in operations { try operation.write(to: &buffer) }
        try await channel.writeAndFlush(buffer)
    }

    public func publish(
        _ subject: String, replyTo: String? = nil, headers: NATSHeaders? = nil, payload: [UInt8] = []
    ) async throws {
        try await send([.publish(subject: subject, replyTo: replyTo, headers: headers, payload: payload)])
    }

    /// Subscribes; `handler` runs on the connection's event loop for each message (keep it short).
    @discardableResult
    public func subscribe(
        _ subject: String, queue: String? = nil, handler: @escaping @Sendable (NATSMessage) -> Void
    ) async throws -> UInt64 {
        let sid = state.withLock { state -> UInt64 in
            defer { state.nextSID += 1 }
            state.subscriptions[state.nextSID] = Subscription(subject: subject, queue: queue, handler: handler)
            return state.nextSID
        }
        do {
            try await send([.subscribe(subject: subject, queue: queue, sid: sid)])
        } catch {
            _ = state.withLock { $0.subscriptions.removeValue(forKey: sid) }
            throw error
        }
        return sid
    }

    public func unsubscribe(_ sid: UInt64) async {
        let known = state.withLock { $0.subscriptions.removeValue(forKey: sid) != nil }
        if known { try? await send([.unsubscribe(sid: sid, max: nil)]) }
    }

    /// Publishes with a reply subject and waits for the first reply. A `503` status reply (no responders)
    /// throws `noResponders`.
    public func request(
        _ subject: String, headers: NATSHeaders? = nil, payload: [UInt8] = [], timeout: Duration = .seconds(5)
    ) async throws -> NATSMessage {
        try await requests([(subject, headers, payload)], timeout: timeout)[0].get()
    }

    /// Many requests written at once, in order (one write); returns each reply or failure, in order (a `503`
    /// status reply, no responders, is a `noResponders` failure). What one request needs a round trip for, a batch
    /// pays once.
    public func requests(
        _ items: [(subject: String, headers: NATSHeaders?, payload: [UInt8])], timeout: Duration = .seconds(5)
    ) async throws -> [Result<NATSMessage, any Error>] {
        let slots = items.map { _ in ReplySlot() }
        let tokens = state.withLock { state -> [String] in
            defer { state.nextRequest += items.count }
            return items.indices.map { "\(inbox).\(state.nextRequest + $0)" }
        }
        state.withLock { state in
            for (token, slot) in zip(tokens, slots) { state.slots[token] = slot }
        }
        let timer = Task {
            try await Task.sleep(for: timeout)
            let expired = self.state.withLock { state in tokens.compactMap { state.slots.removeValue(forKey: $0) } }
            for slot in expired { slot.fill(.failure(NATSError(.timeout, "no reply within \(timeout)"))) }
        }
        defer { timer.cancel() }
        do {
            try await send(
                zip(items, tokens).map {
                    .publish(subject: $0.subject, replyTo: $1, headers: $0.headers, payload: $0.payload)
                })
        } catch {
            let unsent = state.withLock { state in tokens.compactMap { state.slots.removeValue(forKey: $0) } }
            for slot in unsent { slot.fill(.failure(error)) }
        }
        var results: [Result<NATSMessage, any Error>] = []
        results.reserveCapacity(slots.count)
        for slot in slots {
            let result = await slot.value()
            if case .success(let reply) = result, reply.headers?.status == 503 {
                results.append(.failure(NATSError(.noResponders, "no responders")))
            } else {
                results.append(result)
            }
        }
        return results
    }

    /// A round trip to the server: everything sent before has been processed.
    public func flush(timeout: Duration = .seconds(5)) async throws {
        let channel = try await liveChannel()
        try await withDeadline(timeout) {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                self.state.withLock { $0.pongWaiters.append(continuation) }
                var buffer = channel.allocator.buffer(capacity: 8)
                try? NATSClientOperation.ping.write(to: &buffer)
                channel.writeAndFlush(buffer, promise: nil)
            }
        } onTimeout: {
            // Fail the oldest waiter (PONGs answer PINGs in order).
            let waiter = self.state.withLock { state in
                state.pongWaiters.isEmpty ? nil : state.pongWaiters.removeFirst()
            }
            waiter?.resume(throwing: NATSError(.timeout, "no PONG within \(timeout)"))
        }
    }

    public func close() async {
        let (channel, waiters) = state.withLock {
            state -> ((any Channel)?, [(any Error) -> Void]) in
            state.closed = true
            var failures: [(any Error) -> Void] = []
            for waiter in state.connectionWaiters.values { failures.append { waiter.resume(throwing: $0) } }
            for waiter in state.pongWaiters { failures.append { waiter.resume(throwing: $0) } }
            for slot in state.slots.values { failures.append { slot.fill(.failure($0)) } }
            state.slots = [:]
            state.connectionWaiters = [:]
            state.pongWaiters = []
            state.subscriptions = [:]
            defer { state.channel = nil }
            return (state.channel, failures)
        }
        for fail in waiters { fail(NATSError(.closed, "the connection is closed")) }
        try? await channel?.close()
    }

    // MARK: From the channel

    func received(_ message: NATSMessage) {
        if message.sid == Self.inboxSID {
            let slot = state.withLock { $0.slots.removeValue(forKey: message.subject) }
            slot?.fill(.success(message))
            return
        }
        let handler = state.withLock { $0.subscriptions[message.sid]?.handler }
        handler?(message)
    }

    func ponged() {
        let waiter = state.withLock { state in state.pongWaiters.isEmpty ? nil : state.pongWaiters.removeFirst() }
        waiter?.resume()
    }

    /// The connection of `generation` is gone: fail what waited on it and reconnect.
    func lost(generation: Int) {
        let (reconnect, failures) = state.withLock { state -> (Bool, [(any Error) -> Void]) in
            guard state.generation == generation else { return (false, []) }
            let wasLive = state.channel != nil
            state.channel = nil
            var failures: [(any Error) -> Void] = []
            for waiter in state.pongWaiters { failures.append { waiter.resume(throwing: $0) } }
            for slot in state.slots.values { failures.append { slot.fill(.failure($0)) } }
            state.pongWaiters = []
            state.slots = [:]
            // A connection that never became live failed its `attempt`, whose caller retries.
            if state.closed || !wasLive || state.reconnecting { return (false, failures) }
            state.reconnecting = true
            return (true, failures)
        }
        for fail in failures { fail(NATSError(.connectionLost, "the connection to the server was lost")) }
        guard reconnect else { return }
        logger.warning("NATS connection lost; reconnecting")
        Task { await self.reconnectLoop() }
    }

    private func reconnectLoop() async {
        var delay = configuration.reconnectDelay.first
        while !state.withLock({ $0.closed }) {
            state.withLock { $0.serverIndex = ($0.serverIndex + 1) % max(1, configuration.servers.count) }
            do {
                try await attempt()
                logger.info("NATS reconnected")
                return
            } catch {
                logger.debug("NATS reconnect failed", metadata: ["error": "\(error)"])
                try? await Task.sleep(for: delay)
                delay = min(delay * 2, configuration.reconnectDelay.max)
            }
        }
    }
}

/// One awaited reply: filled once (by the reply, a timeout or a lost connection), awaited once.
final class ReplySlot: Sendable {
    let state = Mutex<
        (result: Result<NATSMessage, any Error>?, waiter: CheckedContinuation<Result<NATSMessage, any Error>, Never>?)
    >(
        (nil, nil))

    func fill(_ result: Result<NATSMessage, any Error>) {
        let waiter = state.withLock { state -> CheckedContinuation<Result<NATSMessage, any Error>, Never>? in
            guard state.result == nil else { return nil }
            state.result = result
            defer { state.waiter = nil }
            return state.waiter
        }
        waiter?.resume(returning: result)
    }

    func value() async -> Result<NATSMessage, any Error> {
        await withCheckedContinuation { continuation in
            let ready = state.withLock { state -> Result<NATSMessage, any Error>? in
                if let result = state.result { return result }
                state.waiter = continuation
                return nil
            }
            if let ready { continuation.resume(returning: ready) }
        }
    }
}

/// The INFO → CONNECT → PING → PONG exchange of one connection.
final class Handshake: Sendable {
    let state = Mutex<(done: Result<Void, any Error>?, waiter: CheckedContinuation<Void, any Error>?)>((nil, nil))

    func finish(_ result: Result<Void, any Error>) {
        let waiter = state.withLock { state -> CheckedContinuation<Void, any Error>? in
            guard state.done == nil else { return nil }
            state.done = result
            defer { state.waiter = nil }
            return state.waiter
        }
        waiter?.resume(with: result)
    }

    var isDone: Bool { state.withLock { $0.done != nil } }

    func wait() async throws {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
            let done = state.withLock { state -> Result<Void, any Error>? in
                if let done = state.done { return done }
                state.waiter = continuation
                return nil
            }
            if let done { continuation.resume(with: done) }
        }
    }
}

final class NATSChannelHandler: ChannelInboundHandler, Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let connection: NATSConnection
    let generation: Int
    let handshake: Handshake
    let tls: (context: NIOSSLContext, serverName: String?)?
    let buffered = Mutex<(buffer: ByteBuffer?, parser: NATSParser)>((nil, NATSParser()))

    init(
        connection: NATSConnection, generation: Int, handshake: Handshake,
        tls: (context: NIOSSLContext, serverName: String?)?
    ) {
        self.connection = connection
        self.generation = generation
        self.handshake = handshake
        self.tls = tls
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        var operations: [NATSServerOperation] = []
        var failure: NATSProtocolError?
        buffered.withLock { state in
            if state.buffer == nil || state.buffer!.readableBytes == 0 {
                state.buffer = incoming
            } else {
                state.buffer!.writeBuffer(&incoming)
            }
            do {
                while let operation = try state.parser.next(&state.buffer!) { operations.append(operation) }
            } catch {
                failure = error as? NATSProtocolError ?? NATSProtocolError("\(error)")
            }
            if state.buffer!.readerIndex > 1 << 16 { state.buffer!.discardReadBytes() }
        }
        for operation in operations { handle(operation, context: context) }
        if let failure {
            connection.logger.error("NATS protocol error; closing", metadata: ["error": "\(failure)"])
            handshake.finish(.failure(NATSError(.protocolError, failure.message)))
            context.close(promise: nil)
        }
    }

    private func handle(_ operation: NATSServerOperation, context: ChannelHandlerContext) {
        switch operation {
        case .info(let json):
            connection.state.withLock { $0.info = json }
            if !handshake.isDone {
                let required = json.contains("\"tls_required\":true")
                if let tls {
                    // NATS upgrades after INFO: everything from here on (CONNECT first) goes through TLS.
                    do {
                        let handler = try NIOSSLClientHandler(context: tls.context, serverHostname: tls.serverName)
                        try context.pipeline.syncOperations.addHandler(handler, position: .first)
                    } catch {
                        handshake.finish(.failure(NATSError(.connectionFailed, "TLS cannot start: \(error)")))
                        context.close(promise: nil)
                        return
                    }
                } else if required {
                    handshake.finish(
                        .failure(NATSError(.connectionFailed, "the server requires TLS; configure `tls`")))
                    context.close(promise: nil)
                    return
                }
                var buffer = context.channel.allocator.buffer(capacity: 256)
                try? NATSClientOperation.connect(connection.connectJSON()).write(to: &buffer)
                try? NATSClientOperation.ping.write(to: &buffer)
                context.writeAndFlush(wrapOutboundOut(buffer), promise: nil)
            }
        case .ping:
            var buffer = context.channel.allocator.buffer(capacity: 8)
            try? NATSClientOperation.pong.write(to: &buffer)
            context.writeAndFlush(wrapOutboundOut(buffer), promise: nil)
        case .pong:
            if handshake.isDone { connection.ponged() } else { handshake.finish(.success(())) }
        case .ok:
            break
        case .error(let text):
            if !handshake.isDone {
                handshake.finish(.failure(NATSError(.connectionFailed, "the server refused: \(text)")))
                context.close(promise: nil)
            } else {
                connection.logger.warning("NATS server error", metadata: ["error": "\(text)"])
            }
        case .message(let message):
            connection.received(message)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        handshake.finish(.failure(NATSError(.connectionLost, "the connection closed during the handshake")))
        connection.lost(generation: generation)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        handshake.finish(.failure(NATSError(.connectionFailed, "\(error)")))
        context.close(promise: nil)
    }
}

/// Runs `body`; after `limit`, calls `onTimeout` (which must make `body` finish, e.g. by resuming its
/// continuation with an error).
func withDeadline<T: Sendable>(
    _ limit: Duration, _ body: @escaping @Sendable () async throws -> T,
    onTimeout: @escaping @Sendable () -> Void = {}
) async throws -> T {
    let timer = Task {
        try await Task.sleep(for: limit)
        onTimeout()
    }
    defer { timer.cancel() }
    return try await body()
}

extension String {
    /// An IPv4 or IPv6 literal (no TLS server name is sent for those).
    var isIPAddressLiteral: Bool {
        var v4 = in_addr()
        var v6 = in6_addr()
        return inet_pton(AF_INET, self, &v4) == 1 || inet_pton(AF_INET6, self, &v6) == 1
    }
}
