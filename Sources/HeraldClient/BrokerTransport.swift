import DequeModule
import Herald
import HeraldWire
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import Synchronization

/// An `EventTransport` over the Herald broker's TCP protocol.
///
/// One multiplexed connection carries every publish, subscription and settlement. Concurrent publishes to a topic
/// are coalesced into one frame (and one broker append and fsync); concurrent settlements of a subscription into
/// one frame. When the connection drops it reconnects with exponential backoff, subscribes again, and sends
/// every unacknowledged publish again: the broker's dedup by (`source`, `id`) turns those retries into the
/// original positions, so at-least-once holds across reconnects without duplicates in the log. Deliveries
/// received on a lost connection can no longer be settled (`staleAck`); the broker redelivers them.
public final class BrokerTransport: EventTransport {
    public struct Configuration: Sendable {
        public var host: String
        public var port: Int
        public var clientName: String
        public var credential: Credential
        /// First and largest delay between reconnect attempts.
        public var reconnectDelay: (first: Duration, max: Duration)
        /// Events per publish frame at most (larger batches are split).
        public var maxBatchEvents: Int
        /// How long a publish, subscribe or admin request waits for an unreachable broker before it fails with
        /// `TransportError.unavailable` (once connected, the broker answers or the connection drops).
        public var unreachableTimeout: Duration
        /// Connect with TLS (verifying the broker's certificate against these settings' trust roots).
        public var tls: TLSConfiguration?

        public init(
            host: String = "127.0.0.1", port: Int = 7420, clientName: String = "herald-client",
            credential: Credential = .none,
            reconnectDelay: (first: Duration, max: Duration) = (.milliseconds(50), .seconds(2)),
            maxBatchEvents: Int = 2048, unreachableTimeout: Duration = .seconds(30), tls: TLSConfiguration? = nil
        ) {
            self.tls = tls
            self.host = host
            self.port = port
            self.clientName = clientName
            self.credential = credential
            self.reconnectDelay = reconnectDelay
            self.maxBatchEvents = maxBatchEvents
            self.unreachableTimeout = unreachableTimeout
        }
    }

    struct PublishWaiter {
        let count: Int
        let continuation: CheckedContinuation<[WirePosition], any Error>
        /// When it was queued (monotonic ns), for `unreachableTimeout`.
        var since = monotonicNanoseconds()
    }

    struct PublishBatch {
        let topic: String
        var events: [WireEvent] = []
        var bytes = 0
        var waiters: [PublishWaiter] = []
    }

    struct SettleWaiter {
        let items: [SettleItem]
        let continuation: CheckedContinuation<[Bool], any Error>
    }

    struct Subscription {
        let request: SubscribeRequest
        let buffer: DeliveryBuffer
        var subscribed: CheckedContinuation<Void, any Error>?
        var outbox: [SettleWaiter] = []
        var inflight = Deque<[SettleWaiter]>()
        /// The consumer stopped iterating; kept only so held deliveries can still be settled.
        var ended = false
    }

    struct Connection {
        let channel: any Channel
        let generation: Int
        var machine = ClientConnectionStateMachine()
        var ready = false
    }

    struct State {
        var connection: Connection?
        var generation = 0
        var connecting = false
        var outbox: [PublishBatch] = []
        var inflight: [UInt32: PublishBatch] = [:]
        var admin: [UInt32: CheckedContinuation<[UInt8], any Error>] = [:]
        var adminOutbox: [(command: String, arguments: [UInt8], CheckedContinuation<[UInt8], any Error>)] = []
        var subscriptions: [UInt32: Subscription] = [:]
        var nextSubscriptionID: UInt32 = 0x8000_0000
        var flushScheduled = false
        var closed = false
        var connector: Task<Void, Never>?
        /// When the broker was last reachable (or the first request queued while it was not).
        var unreachableSince: UInt64?
        /// Connections in a row that closed before the welcome (TLS or credentials refused): each waits longer
        /// before the next attempt, and counts as the broker being unreachable.
        var failedHandshakes = 0
        /// Why the broker refused the last handshake, for the error requests fail with.
        var refusal: WireError?
    }

    public let configuration: Configuration
    let group: any EventLoopGroup
    let logger: Logger
    private let state = Mutex(State())

    public init(
        configuration: Configuration, group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        logger: Logger = Logger(label: "herald.client")
    ) {
        self.configuration = configuration
        self.group = group
        self.logger = logger
    }

    public convenience init(host: String = "127.0.0.1", port: Int = 7420, clientName: String = "herald-client") {
        self.init(configuration: Configuration(host: host, port: port, clientName: clientName))
    }

    public var capabilities: TransportCapabilities {
        [.orderingPerKey, .deduplication, .delayedRedelivery, .deadLetters, .durable, .competingConsumers]
    }

    // MARK: Publishing

    public func publish(_ events: [CloudEvent], to topic: String) async throws -> [PublishAck] {
        guard !events.isEmpty else { return [] }
        var wire: [WireEvent] = []
        wire.reserveCapacity(events.count)
        for event in events {
            let encoded: WireEvent
            do {
                encoded = try BinaryEvent.encode(event)
            } catch {
                throw TransportError(.invalidRequest, "event \(event.id) is invalid: \(error.message)")
            }
            // Larger than any frame this client sends: refused here, never sent again and again.
            guard encoded.size <= Self.maxBatchBytes else {
                throw TransportError(
                    .invalidRequest, "event \(event.id) is \(encoded.size) bytes; the most one event can be is 4 MiB")
            }
            wire.append(encoded)
        }
        // A large batch goes as several frames (each within the broker's frame limit), one after the other, so
        // the acknowledgements stay in the batch's order.
        var positions: [WirePosition] = []
        positions.reserveCapacity(wire.count)
        for chunk in Self.chunks(of: wire, maxEvents: configuration.maxBatchEvents, maxBytes: Self.maxBatchBytes) {
            positions += try await withCheckedThrowingContinuation {
                (continuation: CheckedContinuation<[WirePosition], any Error>) in
                let failure = state.withLock { state -> TransportError? in
                    if state.closed { return TransportError(.shutDown, "the transport is shut down") }
                    enqueue(chunk, topic: topic, waiter: continuation, state: &state)
                    return nil
                }
                if let failure { continuation.resume(throwing: failure) } else { scheduleFlush() }
            }
        }
        return zip(events, positions).map {
            PublishAck(id: $0.id, partition: Int($1.partition), offset: $1.offset, duplicate: $1.duplicate)
        }
    }

    /// The most event bytes one publish frame carries (half the broker's default frame limit).
    static let maxBatchBytes = 4 << 20

    /// Splits events into runs of at most `maxEvents` and about `maxBytes` (at least one event each).
    static func chunks(of events: [WireEvent], maxEvents: Int, maxBytes: Int) -> [[WireEvent]] {
        var chunks: [[WireEvent]] = []
        var current: [WireEvent] = []
        var bytes = 0
        for event in events {
            let size = event.size + 8
            if !current.isEmpty, current.count >= maxEvents || bytes + size > maxBytes {
                chunks.append(current)
                current = []
                bytes = 0
            }
            current.append(event)
            bytes += size
        }
        if !current.isEmpty { chunks.append(current) }
        return chunks
    }

    private func enqueue(
        _ events: [WireEvent], topic: String, waiter: CheckedContinuation<[WirePosition], any Error>,
        state: inout State
    ) {
        let bytes = events.reduce(0) { $0 + $1.size + 8 }
        if let last = state.outbox.indices.last, state.outbox[last].topic == topic,
            state.outbox[last].events.count + events.count <= configuration.maxBatchEvents,
            state.outbox[last].bytes + bytes <= Self.maxBatchBytes
        {
            state.outbox[last].events.append(contentsOf: events)
            state.outbox[last].bytes += bytes
            state.outbox[last].waiters.append(PublishWaiter(count: events.count, continuation: waiter))
        } else {
            state.outbox.append(
                PublishBatch(
                    topic: topic, events: events, bytes: bytes,
                    waiters: [PublishWaiter(count: events.count, continuation: waiter)]))
        }
    }

    /// Sends what is queued in one write, soon (after the caller's burst), or connects first.
    private func scheduleFlush() {
        let channel = state.withLock { state -> (any Channel)? in
            guard let connection = state.connection, connection.ready else { return nil }
            if state.flushScheduled { return nil }
            state.flushScheduled = true
            return connection.channel
        }
        guard let channel else {
            ensureConnected()
            return
        }
        channel.eventLoop.execute { self.flush() }
    }

    private func flush() {
        let (channel, buffer) = state.withLock { state -> ((any Channel)?, ByteBuffer?) in
            state.flushScheduled = false
            guard var connection = state.connection, connection.ready else { return (nil, nil) }
            var buffer = connection.channel.allocator.buffer(capacity: 4096)
            for batch in state.outbox {
                let id = connection.machine.request(expecting: .published)
                Message.publish(topic: batch.topic, events: batch.events).write(requestID: id, to: &buffer)
                state.inflight[id] = batch
            }
            state.outbox = []
            for (command, arguments, continuation) in state.adminOutbox {
                let id = connection.machine.request(expecting: .adminResult)
                Message.admin(command: command, arguments: arguments).write(requestID: id, to: &buffer)
                state.admin[id] = continuation
            }
            state.adminOutbox = []
            for id in Array(state.subscriptions.keys) where !state.subscriptions[id]!.outbox.isEmpty {
                let waiters = state.subscriptions[id]!.outbox
                state.subscriptions[id]!.outbox = []
                state.subscriptions[id]!.inflight.append(waiters)
                Message.settle(waiters.flatMap(\.items)).write(requestID: id, to: &buffer)
            }
            state.connection = connection
            return buffer.readableBytes > 0 ? (connection.channel, buffer) : (nil, nil)
        }
        if let channel, let buffer { channel.writeAndFlush(buffer, promise: nil) }
    }

    // MARK: Subscribing

    public func subscribe(topic: String, group: String, options: SubscribeOptions) async throws -> DeliveryStream {
        try await subscribe(
            topic: topic, group: group, options: options, start: options.start == .earliest ? .earliest : .latest)
    }

    /// Joins a group that, when new, starts at `start` (an offset in every partition or a time, too).
    public func subscribe(topic: String, group: String, options: SubscribeOptions, start: WireStart) async throws
        -> DeliveryStream
    {
        let id = state.withLock { state -> UInt32 in
            state.nextSubscriptionID += 1
            return state.nextSubscriptionID
        }
        let (stream, buffer) = DeliveryStream.make { [weak self] in self?.unsubscribe(id) }
        let request = SubscribeRequest(
            topic: topic, group: group, start: start,
            ackWaitMilliseconds: UInt32(clamping: options.ackWait.milliseconds),
            maxDeliveries: UInt32(clamping: options.maxDeliveries),
            backoffMilliseconds: options.backoff.map { UInt32(clamping: $0.milliseconds) }, ordered: options.ordered,
            maxInFlight: UInt32(clamping: options.maxInFlight))
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
            let (failure, channel) = state.withLock { state -> (TransportError?, (any Channel)?) in
                if state.closed { return (TransportError(.shutDown, "the transport is shut down"), nil) }
                state.subscriptions[id] = Subscription(request: request, buffer: buffer, subscribed: continuation)
                guard var connection = state.connection, connection.ready else { return (nil, nil) }
                connection.machine.register(id, expecting: .deliver)
                state.connection = connection
                return (nil, connection.channel)
            }
            if let failure {
                continuation.resume(throwing: failure)
            } else if let channel {
                send(.subscribe(request), requestID: id, on: channel)
            } else {
                ensureConnected()
            }
        }
        return stream
    }

    /// The consumer stopped iterating: the broker sends nothing new, and what it holds stays settle-able until the
    /// ack wait hands it to another member.
    private func unsubscribe(_ id: UInt32) {
        let channel = state.withLock { state -> (any Channel)? in
            guard state.subscriptions[id] != nil else { return nil }
            state.subscriptions[id]!.ended = true
            guard let connection = state.connection, connection.ready else { return nil }
            return connection.channel
        }
        if let channel { send(.unsubscribe, requestID: id, on: channel) }
    }

    fileprivate func settle(_ delivery: Delivery, _ settlement: Settlement, subscription: UInt32, generation: Int)
        async throws
    {
        let item = SettleItem(settlement: wireSettlement(settlement), delivery: delivery)
        if try await settle([item], subscription: subscription, generation: generation)[0] {
            throw TransportError(
                .staleAck,
                "delivery \(delivery.partition)/\(delivery.offset) attempt \(delivery.attempt) is no longer pending")
        }
    }

    private func wireSettlement(_ settlement: Settlement) -> WireSettlement {
        switch settlement {
        case .ack: .ack
        case .nack(let delay): .nack(delayMilliseconds: UInt32(clamping: delay.milliseconds))
        case .terminate(let reason): .terminate(reason: reason)
        }
    }

    /// Queues settlements for the next frame of the subscription; returns their stale flags.
    private func settle(_ items: [SettleItem], subscription: UInt32, generation: Int) async throws -> [Bool] {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<[Bool], any Error>) in
            let failure = state.withLock { state -> TransportError? in
                if state.closed { return TransportError(.shutDown, "the transport is shut down") }
                guard state.connection?.generation == generation, state.subscriptions[subscription] != nil else {
                    return TransportError(
                        .staleAck, "the delivery came on a connection that is gone; the broker redelivers it")
                }
                state.subscriptions[subscription]!.outbox.append(SettleWaiter(items: items, continuation: continuation))
                return nil
            }
            if let failure { continuation.resume(throwing: failure) } else { scheduleFlush() }
        }
    }

    /// Settles many deliveries of this transport at once (one frame, one wait): for consumers that handle
    /// batches. Returns, per delivery, whether it was stale; throws when the connection is gone.
    public func settle(_ deliveries: [Delivery], _ settlement: Settlement) async throws -> [Bool] {
        var results = [Bool](repeating: true, count: deliveries.count)
        // Group by subscription and connection, as the broker settles per subscription.
        var groups: [Settler: [Int]] = [:]
        for (index, delivery) in deliveries.enumerated() {
            guard let settler = delivery.settler as? Settler, settler.transport === self else {
                throw TransportError(.invalidRequest, "delivery \(delivery.offset) did not come from this transport")
            }
            groups[settler, default: []].append(index)
        }
        for (settler, indices) in groups {
            let items = indices.map { SettleItem(settlement: wireSettlement(settlement), delivery: deliveries[$0]) }
            let stale = try await settle(items, subscription: settler.subscription, generation: settler.generation)
            for (index, flag) in zip(indices, stale) { results[index] = flag }
        }
        return results
    }

    // MARK: Administration

    /// Runs an administrative command on the broker (see `AdminCommand` in HeraldBroker); returns its JSON result.
    public func admin(_ command: String, arguments: [UInt8] = []) async throws -> [UInt8] {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<[UInt8], any Error>) in
            let failure = state.withLock { state -> TransportError? in
                if state.closed { return TransportError(.shutDown, "the transport is shut down") }
                state.adminOutbox.append((command, arguments, continuation))
                return nil
            }
            if let failure { continuation.resume(throwing: failure) } else { scheduleFlush() }
        }
    }

    // MARK: The connection

    private func send(_ message: Message, requestID: UInt32, on channel: any Channel) {
        var buffer = channel.allocator.buffer(capacity: 64)
        message.write(requestID: requestID, to: &buffer)
        channel.writeAndFlush(buffer, promise: nil)
    }

    private func ensureConnected() {
        let start = state.withLock { state -> Bool in
            guard state.connection == nil, !state.connecting, !state.closed else { return false }
            state.connecting = true
            return true
        }
        guard start else { return }
        let task = Task { await self.connectLoop() }
        state.withLock { $0.connector = task }
    }

    private func connectLoop() async {
        var delay = configuration.reconnectDelay.first
        while !Task.isCancelled {
            let generation = state.withLock { state -> Int? in
                if state.closed { return nil }
                state.generation += 1
                return state.generation
            }
            guard let generation else { return }
            do {
                let tls = try configuration.tls.map { try NIOSSLContext(configuration: $0) }
                let host = configuration.host
                let channel = try await ClientBootstrap(group: group)
                    .channelOption(.socketOption(.tcp_nodelay), value: 1)
                    .connectTimeout(.seconds(5))
                    .channelInitializer { channel in
                        channel.eventLoop.makeCompletedFuture {
                            if let tls {
                                try channel.pipeline.syncOperations.addHandler(
                                    try NIOSSLClientHandler(context: tls, serverHostname: host.isIPAddress ? nil : host)
                                )
                            }
                            try channel.pipeline.syncOperations.addHandler(
                                ByteToMessageHandler(FrameDecoderHandler(maxFrameSize: 64 << 20)))
                            try channel.pipeline.syncOperations.addHandler(
                                ClientHandler(transport: self, generation: generation))
                        }
                    }
                    .connect(host: configuration.host, port: configuration.port).get()
                let hello = state.withLock { state -> Message? in
                    state.connecting = false
                    if state.closed { return nil }
                    var connection = Connection(channel: channel, generation: generation)
                    guard
                        case .send(let message, _) = connection.machine.connected(
                            Hello(client: configuration.clientName, credential: configuration.credential))
                    else { return nil }
                    state.connection = connection
                    return message
                }
                guard let hello else {
                    try? await channel.close()
                    return
                }
                send(hello, requestID: 0, on: channel)
                // The peer may have closed the channel before it was registered above (a broker refusing TLS or
                // a credential can be faster than this task resumes): its `channelInactive` found no connection
                // of this generation and did nothing, so the loss is handled here. If the close comes later,
                // `channelInactive` handles it and this call finds nothing to do.
                if !channel.isActive { connectionLost(generation: generation) }
                return
            } catch {
                logger.debug("cannot reach the broker; retrying", metadata: ["error": "\(error)", "delay": "\(delay)"])
                failRequestsWaitingTooLong(error)
                try? await Task.sleep(for: delay)
                delay = min(delay * 2, configuration.reconnectDelay.max)
            }
        }
    }

    /// While the broker cannot be reached: fails what has waited longer than `unreachableTimeout` — queued
    /// publishes and admin commands, and subscriptions not yet confirmed.
    private func failRequestsWaitingTooLong(_ cause: any Error) {
        let limit = UInt64(max(0, configuration.unreachableTimeout.milliseconds)) * 1_000_000
        let now = monotonicNanoseconds()
        let failure = TransportError(
            .unavailable,
            "the broker at \(configuration.host):\(configuration.port) has been unreachable for "
                + "\(configuration.unreachableTimeout): \(cause)")
        let resumes = state.withLock { state -> [() -> Void] in
            let since = state.unreachableSince ?? now
            state.unreachableSince = since
            guard now &- since >= limit else { return [] }
            var resumes: [() -> Void] = []
            var kept: [PublishBatch] = []
            for var batch in state.outbox {
                let (old, young) = (
                    batch.waiters.filter { now &- $0.since >= limit }, batch.waiters.filter { now &- $0.since < limit }
                )
                for waiter in old { resumes.append { waiter.continuation.resume(throwing: failure) } }
                guard !young.isEmpty else { continue }
                // Keep the events of the waiters that may still wait (they are the batch's last ones).
                let dropped = old.reduce(0) { $0 + $1.count }
                batch.events.removeFirst(dropped)
                batch.waiters = young
                kept.append(batch)
            }
            state.outbox = kept
            for (_, _, continuation) in state.adminOutbox { resumes.append { continuation.resume(throwing: failure) } }
            state.adminOutbox = []
            for (id, subscription) in state.subscriptions {
                guard let continuation = subscription.subscribed else { continue }
                state.subscriptions.removeValue(forKey: id)
                let buffer = subscription.buffer
                resumes.append {
                    continuation.resume(throwing: failure)
                    buffer.finish()
                }
            }
            return resumes
        }
        for resume in resumes { resume() }
    }

    fileprivate func received(_ frame: Frame, generation: Int) {
        var resumes: [() -> Void] = []
        var pushes: [(DeliveryBuffer, [Delivery])] = []
        var outgoing: [(Message, UInt32)] = []
        var close = false
        var queued = false
        let channel = state.withLock { state -> (any Channel)? in
            guard var connection = state.connection, connection.generation == generation else { return nil }
            let action = connection.machine.received(frame)
            switch action {
            case .none:
                break
            case .send(let message, let requestID):
                outgoing.append((message, requestID))
            case .ready:
                connection.ready = true
                state.unreachableSince = nil
                state.failedHandshakes = 0
                state.refusal = nil
                for (id, subscription) in state.subscriptions where !subscription.ended {
                    connection.machine.register(id, expecting: .deliver)
                    outgoing.append((.subscribe(subscription.request), id))
                }
                state.flushScheduled = false
            case .deliver(let wire, let id):
                if let subscription = state.subscriptions[id], !subscription.ended {
                    let settler = Settler(transport: self, subscription: id, generation: generation)
                    var deliveries: [Delivery] = []
                    deliveries.reserveCapacity(wire.count)
                    for item in wire {
                        guard let event = try? BinaryEvent.decode(item.event) else {
                            logger.error("the broker sent an undecodable event; it will be redelivered")
                            continue
                        }
                        deliveries.append(
                            Delivery(
                                event: event, attempt: Int(item.attempt), partition: Int(item.partition),
                                offset: item.offset, settler: settler))
                    }
                    pushes.append((subscription.buffer, deliveries))
                }
            case .response(let message, let id):
                resumes += respond(message, requestID: id, state: &state)
            case .close(let error):
                logger.warning("the broker connection failed", metadata: ["error": "\(error)"])
                if !connection.ready { state.refusal = error }
                close = true
            }
            state.connection = connection
            // Anything queued while the handshake ran goes out now.
            queued = connection.ready && (!state.outbox.isEmpty || !state.adminOutbox.isEmpty)
            return connection.channel
        }
        for resume in resumes { resume() }
        for (buffer, deliveries) in pushes { buffer.push(deliveries) }
        if let channel {
            for (message, id) in outgoing { send(message, requestID: id, on: channel) }
            if close { channel.close(promise: nil) }
        }
        if queued { scheduleFlush() }
    }

    private func respond(_ message: Message, requestID id: UInt32, state: inout State) -> [() -> Void] {
        if let batch = state.inflight.removeValue(forKey: id) {
            switch message {
            case .published(let positions) where positions.count == batch.events.count:
                var start = 0
                return batch.waiters.map { waiter in
                    let slice = Array(positions[start..<(start + waiter.count)])
                    start += waiter.count
                    return { waiter.continuation.resume(returning: slice) }
                }
            case .error(let error):
                let failure = TransportError(
                    error.code == .invalidEvent || error.code == .invalidRequest ? .invalidRequest : .unavailable,
                    error.message)
                return batch.waiters.map { waiter in { waiter.continuation.resume(throwing: failure) } }
            default:
                let failure = TransportError(.unavailable, "the broker answered a publish with \(message.kind)")
                return batch.waiters.map { waiter in { waiter.continuation.resume(throwing: failure) } }
            }
        }
        if let continuation = state.admin.removeValue(forKey: id) {
            switch message {
            case .adminResult(let json): return [{ continuation.resume(returning: json) }]
            case .error(let error):
                return [{ continuation.resume(throwing: TransportError(.invalidRequest, error.message)) }]
            default:
                return [{ continuation.resume(throwing: TransportError(.unavailable, "unexpected \(message.kind)")) }]
            }
        }
        guard var subscription = state.subscriptions[id] else { return [] }
        defer { state.subscriptions[id] = subscription }
        switch message {
        case .subscribed:
            guard let continuation = subscription.subscribed else { return [] }
            subscription.subscribed = nil
            return [{ continuation.resume() }]
        case .settled(let stale):
            guard let waiters = subscription.inflight.popFirst() else { return [] }
            var start = 0
            return waiters.map { waiter in
                let flags = (start..<(start + waiter.items.count)).map { $0 < stale.count ? stale[$0] : true }
                start += waiter.items.count
                return { waiter.continuation.resume(returning: flags) }
            }
        case .error(let error):
            if let continuation = subscription.subscribed {
                subscription.subscribed = nil
                let buffer = subscription.buffer
                return [
                    {
                        continuation.resume(throwing: TransportError(.invalidRequest, error.message))
                        buffer.finish()
                    }
                ]
            }
            guard let waiters = subscription.inflight.popFirst() else { return [] }
            let failure = TransportError(.unavailable, error.message)
            return waiters.map { waiter in { waiter.continuation.resume(throwing: failure) } }
        default:
            return []
        }
    }

    fileprivate func connectionLost(generation: Int) {
        var resumes: [() -> Void] = []
        var handshakeFailed: (delay: Duration, cause: String)?
        let reconnect = state.withLock { state -> Bool in
            guard let connection = state.connection, connection.generation == generation else { return false }
            state.connection = nil
            if !connection.ready {
                state.failedHandshakes += 1
                let (first, max) = configuration.reconnectDelay
                let delay = min(first * (1 << min(state.failedHandshakes - 1, 16)), max)
                handshakeFailed = (
                    delay,
                    state.refusal.map { "the broker refused the handshake: \($0.message)" }
                        ?? "the connection closed during the handshake (TLS or the broker refused it)"
                )
            }
            state.flushScheduled = false
            // Publishes the broker did not answer go again (dedup makes a retry of a stored event harmless).
            let unanswered = state.inflight.sorted { $0.key < $1.key }.map(\.value)
            state.outbox = unanswered + state.outbox
            state.inflight = [:]
            let lost = TransportError(.unavailable, "the connection to the broker was lost")
            for continuation in state.admin.values { resumes.append { continuation.resume(throwing: lost) } }
            state.admin = [:]
            let stale = TransportError(.staleAck, "the connection was lost before the settlement was confirmed")
            for id in Array(state.subscriptions.keys) {
                let waiters = state.subscriptions[id]!.outbox + state.subscriptions[id]!.inflight.flatMap { $0 }
                state.subscriptions[id]!.outbox = []
                state.subscriptions[id]!.inflight = []
                for waiter in waiters { resumes.append { waiter.continuation.resume(throwing: stale) } }
            }
            return !state.closed
        }
        for resume in resumes { resume() }
        guard reconnect else { return }
        if let (delay, cause) = handshakeFailed {
            failRequestsWaitingTooLong(TransportError(.unavailable, cause))
            Task {
                try? await Task.sleep(for: delay)
                self.ensureConnected()
            }
        } else {
            ensureConnected()
        }
    }

    public func shutdown() async {
        let (channel, connector, waiters) = state.withLock {
            state -> ((any Channel)?, Task<Void, Never>?, [() -> Void]) in
            state.closed = true
            let failure = TransportError(.shutDown, "the transport is shut down")
            var resumes: [() -> Void] = []
            for batch in state.outbox + Array(state.inflight.values) {
                for waiter in batch.waiters { resumes.append { waiter.continuation.resume(throwing: failure) } }
            }
            for continuation in state.admin.values { resumes.append { continuation.resume(throwing: failure) } }
            for (_, _, continuation) in state.adminOutbox {
                resumes.append { continuation.resume(throwing: failure) }
            }
            for subscription in state.subscriptions.values {
                let buffer = subscription.buffer
                for waiter in subscription.outbox + subscription.inflight.flatMap({ $0 }) {
                    resumes.append { waiter.continuation.resume(throwing: failure) }
                }
                if let continuation = subscription.subscribed {
                    resumes.append { continuation.resume(throwing: failure) }
                }
                resumes.append { buffer.finish() }
            }
            state.outbox = []
            state.inflight = [:]
            state.admin = [:]
            state.adminOutbox = []
            state.subscriptions = [:]
            defer { state.connection = nil }
            return (state.connection?.channel, state.connector, resumes)
        }
        connector?.cancel()
        for resume in waiters { resume() }
        try? await channel?.close()
    }

    struct Settler: DeliverySettler, Hashable {
        static func == (lhs: Settler, rhs: Settler) -> Bool {
            lhs.subscription == rhs.subscription && lhs.generation == rhs.generation
        }

        func hash(into hasher: inout Hasher) {
            hasher.combine(subscription)
            hasher.combine(generation)
        }

        weak var transport: BrokerTransport?
        let subscription: UInt32
        let generation: Int

        func settle(_ delivery: Delivery, _ settlement: Settlement) async throws {
            guard let transport else { throw TransportError(.shutDown, "the transport is gone") }
            try await transport.settle(delivery, settlement, subscription: subscription, generation: generation)
        }
    }
}

/// Passes frames and connection loss to the transport.
final class ClientHandler: ChannelInboundHandler, Sendable {
    typealias InboundIn = Frame

    let transport: BrokerTransport
    let generation: Int

    init(transport: BrokerTransport, generation: Int) {
        self.transport = transport
        self.generation = generation
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        transport.received(unwrapInboundIn(data), generation: generation)
    }

    func channelInactive(context: ChannelHandlerContext) {
        transport.connectionLost(generation: generation)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

extension SettleItem {
    init(settlement: WireSettlement, delivery: Delivery) {
        self.init(
            settlement: settlement, partition: UInt32(delivery.partition), offset: delivery.offset,
            attempt: UInt32(delivery.attempt))
    }
}
