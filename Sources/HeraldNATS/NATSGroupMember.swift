import Foundation
import Herald
import Logging
import Synchronization

/// One subscriber of a consumer group on NATS: a fetch loop per durable consumer (one, or one per partition in
/// ordered mode) that keeps a pull request outstanding for as many messages as the member may still hold
/// (`maxInFlight` minus what is unsettled), and turns the messages into deliveries.
final class NATSGroupMember: Sendable {
    struct Pull {
        var wanted = 0
        var received = 0
        var waiter: CheckedContinuation<Void, Never>?
        /// The server refused the pull (409: too many waiting pulls, or the consumer's ack limit): wait a little
        /// before the next one instead of asking again at once.
        var refused = false
    }

    struct State {
        var buffer: DeliveryBuffer?
        var sid: UInt64?
        var loops: [Task<Void, Never>] = []
        var left = false
        var pulls: [Pull]
        /// (consumer, stream sequence) → the ack subject of its newest delivery here, while unsettled: what the
        /// member holds counts against `maxInFlight`.
        var unsettled: [String: String] = [:]
        /// (consumer, stream sequence) → the newest attempt seen: settling an older one is stale.
        var latest: [String: Int] = [:]
        /// Fetch loops waiting for this member to settle something before they pull again.
        var creditWaiters: [UUID: CheckedContinuation<Void, Never>] = [:]
    }

    let transport: NATSTransport
    let topic: String
    let group: String
    let stream: String
    let consumers: [String]
    let options: SubscribeOptions
    let inbox = "_HERALD." + UUID().uuidString.replacingOccurrences(of: "-", with: "")
    let state: Mutex<State>

    init(
        transport: NATSTransport, topic: String, group: String, stream: String, consumers: [String],
        options: SubscribeOptions
    ) {
        self.transport = transport
        self.topic = topic
        self.group = group
        self.stream = stream
        self.consumers = consumers
        self.options = options
        state = Mutex(State(pulls: Array(repeating: Pull(), count: consumers.count)))
    }

    func start(_ buffer: DeliveryBuffer) async throws {
        let sid = try await transport.connection.subscribe(inbox + ".*") { [weak self] message in
            self?.received(message)
        }
        state.withLock { state in
            state.buffer = buffer
            state.sid = sid
            state.loops = consumers.indices.map { index in Task { await self.fetchLoop(index) } }
        }
    }

    /// How many messages consumer `index` may pull now: ordered, one while this member holds none of that
    /// partition (the consumer lets one out at a time; a pull could only wait or be refused); else up to
    /// `maxInFlight` minus what the member holds.
    private func wanted(_ index: Int, _ state: State) -> Int {
        if options.ordered {
            let prefix = consumers[index] + "."
            return state.unsettled.keys.contains { $0.hasPrefix(prefix) } ? 0 : 1
        }
        return min(256, max(0, options.maxInFlight - state.unsettled.count))
    }

    private func fetchLoop(_ index: Int) async {
        while !Task.isCancelled, !state.withLock({ $0.left }) {
            if state.withLock({ $0.pulls[index].refused }) {
                state.withLock { $0.pulls[index].refused = false }
                try? await Task.sleep(for: .milliseconds(50))
            }
            let want = state.withLock { wanted(index, $0) }
            guard want > 0 else {
                await waitForCredit(index)
                continue
            }
            state.withLock { $0.pulls[index] = Pull(wanted: want) }
            do {
                try await transport.jetStream.pull(
                    stream: stream, consumer: consumers[index], inbox: "\(inbox).\(index)", batch: want,
                    expires: .seconds(1))
            } catch {
                try? await Task.sleep(for: .milliseconds(100))
                continue
            }
            // Until the server ends the pull (408 at expiry, 404/409) or all wanted messages came.
            let timer = Task {
                try? await Task.sleep(for: .milliseconds(1500))
                self.endPull(index)
            }
            await withCheckedContinuation { continuation in
                let done = state.withLock { state -> Bool in
                    if state.pulls[index].received >= state.pulls[index].wanted || state.pulls[index].wanted == 0 {
                        return true
                    }
                    state.pulls[index].waiter = continuation
                    return false
                }
                if done { continuation.resume() }
            }
            timer.cancel()
        }
    }

    private func endPull(_ index: Int) {
        let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
            state.pulls[index].wanted = 0
            defer { state.pulls[index].waiter = nil }
            return state.pulls[index].waiter
        }
        waiter?.resume()
    }

    private func received(_ message: NATSMessage) {
        // Status messages come on the pull's inbox (`<inbox>.<consumer index>`); messages keep their stream
        // subject and name their consumer in the ack subject.
        if let status = message.headers?.status {
            guard let index = message.subject.split(separator: ".").last.flatMap({ Int($0) }),
                consumers.indices.contains(index)
            else { return }
            if status == 409 { state.withLock { $0.pulls[index].refused = true } }
            if status != 100 { endPull(index) }  // 100: idle heartbeat
            return
        }
        guard let reply = message.replyTo, let info = JetStream.MessageInfo(ackSubject: reply),
            let index = consumers.firstIndex(of: info.consumer)
        else { return }
        let (buffer, pullDone) = state.withLock { state -> (DeliveryBuffer?, CheckedContinuation<Void, Never>?) in
            state.pulls[index].received += 1
            var waiter: CheckedContinuation<Void, Never>?
            if state.pulls[index].received >= state.pulls[index].wanted {
                waiter = state.pulls[index].waiter
                state.pulls[index].waiter = nil
            }
            if state.left { return (nil, waiter) }
            let key = "\(info.consumer).\(info.streamSequence)"
            state.unsettled[key] = reply
            state.latest[key] = max(state.latest[key] ?? 0, info.delivered)
            if state.latest.count > 100_000 { state.latest = [key: info.delivered] }
            return (state.buffer, waiter)
        }
        pullDone?.resume()
        let partition = Int(message.subject.split(separator: ".").last ?? "") ?? 0
        let event: CloudEvent
        do {
            event = try CloudEventHTTPBinding.decodeBinary(
                headers: message.headers?.fields ?? [], body: message.payload)
        } catch {
            transport.logger.error(
                "a message on \(message.subject) is not a CloudEvent; terminated", metadata: ["error": "\(error)"])
            Task { try? await self.settle(reply: reply, .term(reason: "not a CloudEvent: \(error)")) }
            return
        }
        let settler = NATSSettler(
            member: self, reply: reply, key: "\(info.consumer).\(info.streamSequence)", attempt: info.delivered,
            deadline: ContinuousClock.now + options.ackWait)
        if info.delivered > options.maxDeliveries {
            // The ack wait passed on the last attempt: the event has had its deliveries.
            Task {
                try? await settler.deadLetter(
                    event, reason: "not acknowledged within the ack wait after \(options.maxDeliveries) deliveries",
                    attempts: options.maxDeliveries)
            }
            return
        }
        let delivery = Delivery(
            event: event, attempt: info.delivered, partition: partition,
            offset: Int64(clamping: info.streamSequence), settler: settler)
        if buffer?.push(CollectionOfOne(delivery)) != true {
            Task { try? await self.settle(reply: reply, .nak(delay: .zero)) }
        }
    }

    /// Sends the acknowledgement and forgets the delivery.
    func settle(reply: String, _ acknowledgement: JetStream.Acknowledgement) async throws {
        forget([reply])
        try await transport.jetStream.acknowledge(reply, acknowledgement)
    }

    /// Forgets deliveries being settled (they no longer count against what this member may hold).
    func forget(_ replies: [String]) {
        let keys = replies.compactMap { reply in
            JetStream.MessageInfo(ackSubject: reply).map { (key: "\($0.consumer).\($0.streamSequence)", reply: reply) }
        }
        guard !keys.isEmpty else { return }
        state.withLock { state in
            for (key, reply) in keys where state.unsettled[key] == reply { state.unsettled[key] = nil }
        }
        wakeCreditWaiters()
    }

    /// Waits until consumer `index` may pull again (something was settled), or 200 ms at most.
    private func waitForCredit(_ index: Int) async {
        let id = UUID()
        await withCheckedContinuation { continuation in
            let ready = state.withLock { state -> Bool in
                if state.left || wanted(index, state) > 0 { return true }
                state.creditWaiters[id] = continuation
                return false
            }
            if ready { return continuation.resume() }
            Task {
                try? await Task.sleep(for: .milliseconds(200))
                self.state.withLock { $0.creditWaiters.removeValue(forKey: id) }?.resume()
            }
        }
    }

    private func wakeCreditWaiters() {
        let waiters = state.withLock { state in
            defer { state.creditWaiters = [:] }
            return Array(state.creditWaiters.values)
        }
        for waiter in waiters { waiter.resume() }
    }

    func isCurrent(key: String, attempt: Int) -> Bool {
        state.withLock { $0.latest[key] ?? attempt } == attempt
    }

    /// Stops fetching. What the consumer took it may still settle (or it comes again after the ack wait, to the
    /// group's other members); what arrives from pulls still outstanding is nakked at once.
    func leave() async {
        let (loops, sid, buffer) = state.withLock { state in
            let taken = (state.loops, state.sid, state.buffer)
            state.left = true
            state.loops = []
            state.sid = nil
            state.buffer = nil
            return taken
        }
        for loop in loops { loop.cancel() }
        for index in consumers.indices { endPull(index) }
        wakeCreditWaiters()
        buffer?.finish()
        guard let sid else { return }
        // Pulls end within their 1 s expiry; their messages are nakked until then.
        Task {
            try? await Task.sleep(for: .milliseconds(1500))
            await self.transport.connection.unsubscribe(sid)
        }
    }
}

/// Settles one NATS delivery: ack, nak (dead-letter at the last attempt) or terminate (dead-letter).
final class NATSSettler: DeliverySettler {
    let member: NATSGroupMember
    let reply: String
    let key: String
    let attempt: Int
    let deadline: ContinuousClock.Instant
    let settled = Atomic<Bool>(false)

    init(member: NATSGroupMember, reply: String, key: String, attempt: Int, deadline: ContinuousClock.Instant) {
        self.member = member
        self.reply = reply
        self.key = key
        self.attempt = attempt
        self.deadline = deadline
    }

    /// Takes the right to settle this delivery once; throws `staleAck` if it was settled or superseded.
    func claim() throws(TransportError) {
        guard !settled.exchange(true, ordering: .relaxed) else {
            throw TransportError(.staleAck, "this delivery was already settled")
        }
        guard member.isCurrent(key: key, attempt: attempt), ContinuousClock.now < deadline else {
            throw TransportError(.staleAck, "attempt \(attempt) was superseded (ack wait passed or redelivered)")
        }
    }

    func settle(_ delivery: Delivery, _ settlement: Settlement) async throws {
        try claim()
        do {
            switch settlement {
            case .ack:
                try await member.settle(reply: reply, .ack)
            case .nack(let delay):
                if attempt >= member.options.maxDeliveries {
                    try await deadLetter(
                        delivery.event, reason: "nacked on each of \(attempt) deliveries", attempts: attempt)
                } else {
                    try await member.settle(reply: reply, .nak(delay: delay))
                }
            case .terminate(let reason):
                try await deadLetter(delivery.event, reason: reason, attempts: attempt)
            }
        } catch let error as NATSError {
            throw TransportError(error.code == .closed ? .shutDown : .unavailable, "settling: \(error)")
        }
    }

    func deadLetter(_ event: CloudEvent, reason: String, attempts: Int) async throws {
        try await member.transport.deadLetter(
            event, topic: member.topic, group: member.group, reason: reason, attempts: attempts)
        try await member.settle(reply: reply, .term(reason: reason))
    }
}
