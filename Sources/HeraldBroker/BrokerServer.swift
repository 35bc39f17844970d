import HeraldAuth
import HeraldWire
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import ServiceLifecycle
import Synchronization

/// The broker's TCP server: frames in, the connection state machine decides, the engine does the work.
public final class BrokerServer: Service, Sendable {
    public let broker: Broker
    public let host: String
    public let port: Int
    let group: any EventLoopGroup
    let logger: Logger
    /// With an authenticator, every connection must authenticate in its hello (within the handshake deadline)
    /// and every request is checked against the principal's permissions.
    let authenticator: Authenticator?
    let tls: NIOSSLContext?
    private let channel = Mutex<(any Channel)?>(nil)
    /// The open client connections, so stopping the server closes them (clients then reconnect elsewhere).
    private let connections = Mutex([ObjectIdentifier: any Channel]())

    public init(
        broker: Broker, host: String = "127.0.0.1", port: Int = 7420,
        group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton, authenticator: Authenticator? = nil,
        tls: NIOSSLContext? = nil, logger: Logger = Logger(label: "herald.tcp")
    ) {
        self.broker = broker
        self.host = host
        self.port = port
        self.group = group
        self.authenticator = authenticator
        self.tls = tls
        self.logger = logger
    }

    /// Binds and starts accepting; returns the bound port (useful with port 0).
    @discardableResult
    public func start() async throws -> Int {
        let configuration = broker.configuration
        let welcome = Welcome(
            server: "herald", maxFrameSize: UInt32(configuration.maxFrameBytes),
            maxEventSize: UInt32(configuration.maxEventBytes))
        let broker = self.broker
        let logger = self.logger
        let authenticator = self.authenticator
        let tls = self.tls
        let bootstrap = ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 256)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelOption(
                .writeBufferWaterMark,
                value: .init(
                    low: configuration.maxOutboundBytesPerConnection / 2,
                    high: configuration.maxOutboundBytesPerConnection)
            )
            .childChannelInitializer { [self] channel in
                let admitted = connections.withLock { open -> Bool in
                    guard open.count < configuration.maxConnections else { return false }
                    open[ObjectIdentifier(channel)] = channel
                    return true
                }
                guard admitted else {
                    return channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(
                            RefusingHandler(
                                error: WireError(.unavailable, "the broker is at its connection limit; retry later")))
                    }
                }
                channel.closeFuture.whenComplete { _ in
                    self.connections.withLock { _ = $0.removeValue(forKey: ObjectIdentifier(channel)) }
                }
                return channel.eventLoop.makeCompletedFuture {
                    if let tls { try channel.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: tls)) }
                    try channel.pipeline.syncOperations.addHandler(
                        ByteToMessageHandler(FrameDecoderHandler(maxFrameSize: configuration.maxFrameBytes)))
                    try channel.pipeline.syncOperations.addHandler(
                        BrokerConnectionHandler(
                            broker: broker, welcome: welcome, authenticator: authenticator, logger: logger))
                }
            }
        let bound = try await bootstrap.bind(host: host, port: port).get()
        channel.withLock { $0 = bound }
        logger.info("broker listening", metadata: ["address": "\(bound.localAddress.map { "\($0)" } ?? "?")"])
        return bound.localAddress?.port ?? port
    }

    /// Stops accepting, then closes every client connection (their unsettled deliveries go back to their groups;
    /// clients reconnect and resend what was not acknowledged).
    public func stop() async {
        let bound = channel.withLock { channel -> (any Channel)? in
            defer { channel = nil }
            return channel
        }
        try? await bound?.close()
        let open = connections.withLock { Array($0.values) }
        for connection in open { try? await connection.close() }
    }

    public func run() async throws {
        try await start()
        try? await gracefulShutdown()
        await stop()
    }
}

/// Answers a connection the broker will not serve with an error frame, then closes it.
final class RefusingHandler: ChannelInboundHandler, Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer
    let error: WireError

    init(error: WireError) {
        self.error = error
    }

    func channelActive(context: ChannelHandlerContext) {
        var buffer = context.channel.allocator.buffer(capacity: 64)
        Message.error(error).write(requestID: 0, to: &buffer)
        let loopBound = NIOLoopBound(context, eventLoop: context.eventLoop)
        context.writeAndFlush(wrapOutboundOut(buffer)).whenComplete { _ in loopBound.value.close(promise: nil) }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {}
}

/// A subscription on a TCP connection, as a member of its consumer group.
final class TCPMember: BrokerMember {
    let channel: any Channel
    let subscriptionID: UInt32

    init(channel: any Channel, subscriptionID: UInt32) {
        self.channel = channel
        self.subscriptionID = subscriptionID
    }

    func deliver(_ deliveries: [WireDelivery]) -> Bool {
        guard channel.isActive else { return false }
        var buffer = channel.allocator.buffer(capacity: deliveries.reduce(16) { $0 + 32 + $1.event.size })
        Message.deliver(deliveries).write(requestID: subscriptionID, to: &buffer)
        channel.writeAndFlush(buffer, promise: nil)
        return true
    }

    var canAcceptDeliveries: Bool { channel.isWritable }
}

/// One broker connection: runs the protocol state machine and executes its actions.
final class BrokerConnectionHandler: ChannelInboundHandler {
    typealias InboundIn = Frame
    typealias OutboundOut = ByteBuffer

    let broker: Broker
    let logger: Logger
    let authenticator: Authenticator?
    var machine: ServerConnectionStateMachine
    /// Who this connection acts for (anonymous with everything allowed when authentication is off).
    var principal = Principal.anonymous
    /// subscription id → broker member id
    var members: [UInt32: Int] = [:]
    var handshakeTimeout: Scheduled<Void>?

    init(broker: Broker, welcome: Welcome, authenticator: Authenticator?, logger: Logger) {
        self.broker = broker
        self.logger = logger
        self.authenticator = authenticator
        self.machine = ServerConnectionStateMachine(welcome: welcome, requiresAuthentication: authenticator != nil)
    }

    func channelActive(context: ChannelHandlerContext) {
        let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        handshakeTimeout = context.eventLoop.scheduleTask(in: .seconds(10)) {
            let (handler, context) = bound.value
            handler.execute(
                handler.machine.decodingFailed(WireError(.unauthenticated, "no hello within 10 seconds")),
                context: context)
        }
        context.fireChannelActive()
    }

    func channelInactive(context: ChannelHandlerContext) {
        handshakeTimeout?.cancel()
        for member in members.values { broker.unsubscribe(member: member) }
        members = [:]
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        execute(machine.received(unwrapInboundIn(data)), context: context)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        let wire = (error as? WireError) ?? WireError(.malformedFrame, "\(error)")
        execute(machine.decodingFailed(wire), context: context)
    }

    private func execute(_ action: ServerConnectionStateMachine.Action, context: ChannelHandlerContext) {
        switch action {
        case .none:
            break
        case .reply(let message, let requestID):
            if case .welcome = message { handshakeTimeout?.cancel() }
            write(message, requestID: requestID, context: context)
        case .close(let error, let requestID):
            logger.debug("closing a connection", metadata: ["error": "\(error)"])
            write(.error(error), requestID: requestID, context: context)
            context.close(promise: nil)
        case .handle(let request, let requestID):
            handle(request, requestID: requestID, context: context)
        }
    }

    private func write(_ message: Message, requestID: UInt32, context: ChannelHandlerContext) {
        var buffer = context.channel.allocator.buffer(capacity: 64)
        message.write(requestID: requestID, to: &buffer)
        context.writeAndFlush(wrapOutboundOut(buffer), promise: nil)
    }

    private func handle(
        _ request: ServerConnectionStateMachine.Request, requestID: UInt32, context: ChannelHandlerContext
    ) {
        let broker = self.broker
        let channel = context.channel
        let principal = self.principal
        switch request {
        case .authenticate(let credential):
            guard let authenticator else { return }
            let bound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
            Task {
                var refusal: WireError?
                var principal = Principal.anonymous
                do {
                    guard case .bearer(let token) = credential else {
                        throw AuthError(.unauthenticated, "this broker requires a bearer token in the hello")
                    }
                    principal = try await authenticator.authenticate(token: token)
                } catch {
                    refusal = WireError(.unauthenticated, (error as? AuthError)?.message ?? "\(error)")
                }
                bound.eventLoop.execute { [refusal, principal] in
                    let (handler, context) = bound.value
                    if let refusal {
                        handler.execute(
                            handler.machine.authenticationFailed(refusal, requestID: requestID), context: context)
                    } else {
                        handler.principal = principal
                        handler.execute(handler.machine.authenticated(requestID: requestID), context: context)
                    }
                }
            }
        case .publish(let topic, let events):
            do throws(AuthError) {
                try principal.require(.publish, on: topic)
            } catch {
                write(.error(error.wireError), requestID: requestID, context: context)
                return
            }
            Task {
                let reply: Message
                do {
                    reply = .published(try await broker.publish(topic: topic, events: events))
                } catch {
                    reply = .error((error as? BrokerError)?.wireError ?? WireError(.internalError, "\(error)"))
                }
                var buffer = channel.allocator.buffer(capacity: 16 + 13 * events.count)
                reply.write(requestID: requestID, to: &buffer)
                channel.writeAndFlush(buffer, promise: nil)
            }
        case .subscribe(let subscribe):
            do throws(AuthError) {
                try principal.require(.subscribe, on: subscribe.topic)
            } catch {
                machine.subscriptionEnded(requestID)
                write(.error(error.wireError), requestID: requestID, context: context)
                return
            }
            do {
                let member = TCPMember(channel: channel, subscriptionID: requestID)
                members[requestID] = try broker.subscribe(subscribe, member: member)
                write(.subscribed, requestID: requestID, context: context)
            } catch {
                machine.subscriptionEnded(requestID)
                write(.error(error.wireError), requestID: requestID, context: context)
            }
        case .settle(let items):
            guard let member = members[requestID] else { return }
            write(.settled(stale: broker.settle(member: member, items)), requestID: requestID, context: context)
        case .unsubscribe:
            if let member = members[requestID] { broker.unsubscribe(member: member, keepPending: true) }
        case .admin(let command, let arguments):
            Task {
                let reply: Message
                do {
                    reply = .adminResult(
                        try await AdminCommand.run(command, arguments: arguments, on: broker, as: principal))
                } catch {
                    reply = .error(
                        (error as? BrokerError)?.wireError ?? (error as? AuthError)?.wireError
                            ?? WireError(.internalError, "\(error)"))
                }
                var buffer = channel.allocator.buffer(capacity: 64)
                reply.write(requestID: requestID, to: &buffer)
                channel.writeAndFlush(buffer, promise: nil)
            }
        }
    }
}

extension AuthError {
    var wireError: WireError {
        switch code {
        case .unauthenticated: WireError(.unauthenticated, message)
        case .forbidden: WireError(.forbidden, message)
        }
    }
}

extension BrokerError {
    var wireError: WireError {
        switch code {
        case .invalidEvent: WireError(.invalidEvent, message)
        case .invalidRequest, .notFound: WireError(.invalidRequest, message)
        case .unavailable, .shutDown: WireError(.unavailable, message)
        default: WireError(.internalError, message)
        }
    }
}
