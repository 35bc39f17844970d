import Synchronization

/// An `EventTransport` inside one process: topics with partitions, consumer groups, acks with attempts,
/// ack-wait redelivery with backoff, delayed nacks, dead letters to `<topic>.dlq`, dedup by (`source`, `id`),
/// and per-key order. Nothing survives the process: it is for tests, single-process deployments, and as the
/// reference the shared conformance suite is written against.
public final class InMemoryTransport: EventTransport {
    public struct Configuration: Sendable {
        /// Partitions of a topic created on first use.
        public var partitions: Int
        /// How long a (`source`, `id`) is remembered for dedup.
        public var dedupWindow: Duration
        /// How often ack deadlines and delayed redeliveries are checked.
        public var tick: Duration
        /// Encode typed data to JSON bytes on publish, as a networked transport would (catches codec bugs).
        public var encodeData: Bool

        public init(
            partitions: Int = 4, dedupWindow: Duration = .seconds(120), tick: Duration = .milliseconds(5),
            encodeData: Bool = true
        ) {
            self.partitions = max(1, partitions)
            self.dedupWindow = dedupWindow
            self.tick = tick
            self.encodeData = encodeData
        }
    }

    struct Position: Hashable {
        let partition: Int
        let offset: Int64
    }

    struct Pending {
        let attempt: Int
        let deadline: UInt64
        let member: Int
        let key: String?
    }

    struct Redelivery {
        let due: UInt64
        let position: Position
        let attempt: Int
    }

    struct Member {
        let buffer: DeliveryBuffer
        let settler: Settler
        var inFlight = 0
    }

    struct Group {
        let options: SubscribeOptions
        var cursors: [Int64]
        var pending: [Position: Pending] = [:]
        var redeliveries: [Redelivery] = []
        /// Keys with an event pending or awaiting redelivery (ordered mode).
        var busyKeys: [String: Int] = [:]
        var members: [Int: Member] = [:]
        var memberOrder: [Int] = []
        var nextMember = 0
        var delivered = 0
        var redelivered = 0
        var deadLettered = 0
    }

    struct Topic {
        var partitions: [[CloudEvent]]
        var dedup: [DedupKey: (ack: PublishAck, at: UInt64)] = [:]
        var dedupOrder: [(DedupKey, UInt64)] = []
        var dedupStart = 0
        var groups: [String: Group] = [:]
        var roundRobin = 0
    }

    struct DedupKey: Hashable {
        let source: String
        let id: EventID
    }

    struct State {
        var topics: [String: Topic] = [:]
        var nextMemberID = 0
        var ticker: Task<Void, Never>?
        var closed = false
    }

    public let configuration: Configuration
    private let state = Mutex(State())

    public init(configuration: Configuration = Configuration()) {
        self.configuration = configuration
    }

    public var capabilities: TransportCapabilities {
        [.orderingPerKey, .deduplication, .delayedRedelivery, .deadLetters, .competingConsumers]
    }

    // MARK: Publishing

    public func publish(_ events: [CloudEvent], to topic: String) async throws -> [PublishAck] {
        var prepared: [CloudEvent] = []
        prepared.reserveCapacity(events.count)
        for var event in events {
            do {
                try event.validate()
                if configuration.encodeData, case .value = event.data {
                    let bytes = try event.data.encoded()
                    event.data = bytes.map(EventData.bytes) ?? .none
                    if event.datacontenttype == nil { event.datacontenttype = "application/json" }
                }
            } catch {
                throw TransportError(.invalidRequest, "event \(event.id) is invalid: \(error.message)")
            }
            prepared.append(event)
        }
        return try state.withLock { state throws(TransportError) -> [PublishAck] in
            guard !state.closed else { throw TransportError(.shutDown, "the transport is shut down") }
            let now = monotonicNanoseconds()
            var acks: [PublishAck] = []
            acks.reserveCapacity(prepared.count)
            for event in prepared { acks.append(append(event, to: topic, now: now, state: &state)) }
            pump(topic, state: &state, now: now)
            return acks
        }
    }

    private func append(_ event: CloudEvent, to name: String, now: UInt64, state: inout State) -> PublishAck {
        var topic = state.topics.removeValue(forKey: name) ?? newTopic()
        defer { state.topics[name] = topic }
        let window = UInt64(max(0, configuration.dedupWindow.nanoseconds))
        while topic.dedupStart < topic.dedupOrder.count, now &- topic.dedupOrder[topic.dedupStart].1 > window {
            let (key, at) = topic.dedupOrder[topic.dedupStart]
            if topic.dedup[key]?.at == at { topic.dedup.removeValue(forKey: key) }
            topic.dedupStart += 1
        }
        let key = DedupKey(source: event.source, id: event.id)
        if let original = topic.dedup[key] {
            return PublishAck(
                id: event.id, partition: original.ack.partition, offset: original.ack.offset, duplicate: true)
        }
        let partition = PartitionHash.partition(
            forKey: event.partitionkey, count: topic.partitions.count, roundRobin: &topic.roundRobin)
        let offset = Int64(topic.partitions[partition].count)
        topic.partitions[partition].append(event)
        let ack = PublishAck(id: event.id, partition: partition, offset: offset, duplicate: false)
        topic.dedup[key] = (ack, now)
        topic.dedupOrder.append((key, now))
        return ack
    }

    private func newTopic() -> Topic {
        Topic(partitions: Array(repeating: [], count: configuration.partitions))
    }

    // MARK: Subscribing

    public func subscribe(topic name: String, group groupName: String, options: SubscribeOptions) async throws
        -> DeliveryStream
    {
        let memberID = state.withLock { state -> Int in
            state.nextMemberID += 1
            return state.nextMemberID
        }
        let (stream, buffer) = DeliveryStream.make { [weak self] in
            self?.memberLeft(topic: name, group: groupName, member: memberID)
        }
        let settler = Settler(transport: self, topic: name, group: groupName)
        try state.withLock { state throws(TransportError) in
            guard !state.closed else { throw TransportError(.shutDown, "the transport is shut down") }
            var topic = state.topics.removeValue(forKey: name) ?? newTopic()
            var group =
                topic.groups.removeValue(forKey: groupName)
                ?? Group(
                    options: options,
                    cursors: options.start == .earliest
                        ? Array(repeating: 0, count: topic.partitions.count)
                        : topic.partitions.map { Int64($0.count) })
            group.members[memberID] = Member(buffer: buffer, settler: settler)
            group.memberOrder.append(memberID)
            topic.groups[groupName] = group
            state.topics[name] = topic
            startTickerIfNeeded(&state)
            pump(name, state: &state, now: monotonicNanoseconds())
        }
        return stream
    }

    private func startTickerIfNeeded(_ state: inout State) {
        guard state.ticker == nil else { return }
        let tick = configuration.tick
        state.ticker = Task { [weak self] in
            while !Task.isCancelled {
                try? await Task.sleep(for: tick)
                guard let self else { return }
                self.tickOnce()
            }
        }
    }

    /// Expires ack deadlines and releases due redeliveries.
    func tickOnce() {
        state.withLock { state in
            let now = monotonicNanoseconds()
            for name in Array(state.topics.keys) {
                // Take values out of their containers while mutating them: a copy left behind would make every
                // mutation copy the whole dictionary (copy-on-write).
                guard var topic = state.topics.removeValue(forKey: name) else { continue }
                var deadLetters: [CloudEvent] = []
                for groupName in Array(topic.groups.keys) {
                    var group = topic.groups.removeValue(forKey: groupName)!
                    let expired = group.pending.filter { $0.value.deadline <= now }
                    for (position, pending) in expired {
                        group.pending.removeValue(forKey: position)
                        group.members[pending.member]?.inFlight -= 1
                        retryOrDeadLetter(
                            position, attempt: pending.attempt, key: pending.key,
                            delay: group.options.backoff.delay(forAttempt: pending.attempt),
                            reason: "ack wait of \(group.options.ackWait) expired", topic: topic, group: &group,
                            groupName: groupName, now: now, deadLetters: &deadLetters)
                    }
                    topic.groups[groupName] = group
                }
                state.topics[name] = topic
                publishDeadLetters(deadLetters, of: name, now: now, state: &state)
                pump(name, state: &state, now: now)
            }
        }
    }

    private func retryOrDeadLetter(
        _ position: Position, attempt: Int, key: String?, delay: Duration, reason: String, topic: Topic,
        group: inout Group, groupName: String, now: UInt64, deadLetters: inout [CloudEvent]
    ) {
        if attempt >= group.options.maxDeliveries {
            deadLetters.append(
                deadLetter(
                    topic.partitions[position.partition][Int(position.offset)], reason: reason, attempts: attempt,
                    key: key, group: &group, groupName: groupName))
        } else {
            group.redeliveries.append(
                Redelivery(due: now + UInt64(max(0, delay.nanoseconds)), position: position, attempt: attempt))
        }
    }

    /// Appends dead letters to `<topic>.dlq` and delivers them to that topic's groups.
    private func publishDeadLetters(_ letters: [CloudEvent], of topic: String, now: UInt64, state: inout State) {
        guard !letters.isEmpty else { return }
        for letter in letters { _ = append(letter, to: topic + ".dlq", now: now, state: &state) }
        pump(topic + ".dlq", state: &state, now: now)
    }

    /// The dead letter of an event for a group (reason and attempts as extensions); counts it and frees its key.
    private func deadLetter(
        _ event: CloudEvent, reason: String, attempts: Int, key: String?, group: inout Group, groupName: String
    ) -> CloudEvent {
        group.deadLettered += 1
        release(key, in: &group)
        var letter = event
        letter.extensions["deadletterreason"] = .string(reason)
        letter.extensions["deliveryattempts"] = .integer(Int32(clamping: attempts))
        letter.extensions["deadlettergroup"] = .string(groupName)
        return letter
    }

    private func release(_ key: String?, in group: inout Group) {
        guard let key, let count = group.busyKeys[key] else { return }
        if count <= 1 { group.busyKeys.removeValue(forKey: key) } else { group.busyKeys[key] = count - 1 }
    }

    /// Delivers what each member of each group of a topic has room for: due redeliveries first, then new events.
    private func pump(_ name: String, state: inout State, now: UInt64) {
        guard var topic = state.topics.removeValue(forKey: name) else { return }
        defer { state.topics[name] = topic }
        for groupName in Array(topic.groups.keys) {
            var group = topic.groups.removeValue(forKey: groupName)!
            defer { topic.groups[groupName] = group }
            guard !group.memberOrder.isEmpty else { continue }
            var outgoing: [Int: [Delivery]] = [:]
            // Redeliveries that are due, oldest first.
            group.redeliveries.sort {
                ($0.due, $0.position.partition, $0.position.offset) < (
                    $1.due, $1.position.partition, $1.position.offset
                )
            }
            var remaining: [Redelivery] = []
            for redelivery in group.redeliveries {
                guard redelivery.due <= now, let member = pickMember(&group) else {
                    remaining.append(redelivery)
                    continue
                }
                let event = topic.partitions[redelivery.position.partition][Int(redelivery.position.offset)]
                outgoing[member, default: []].append(
                    deliver(
                        event, at: redelivery.position, attempt: redelivery.attempt + 1, to: member, group: &group,
                        now: now, holdsKey: true))
                group.redelivered += 1
            }
            group.redeliveries = remaining
            // New events, partition by partition.
            for partition in topic.partitions.indices {
                while group.cursors[partition] < Int64(topic.partitions[partition].count) {
                    let offset = group.cursors[partition]
                    let event = topic.partitions[partition][Int(offset)]
                    if group.options.ordered, let key = event.partitionkey, group.busyKeys[key] != nil { break }
                    guard let member = pickMember(&group) else { break }
                    let position = Position(partition: partition, offset: offset)
                    outgoing[member, default: []].append(
                        deliver(event, at: position, attempt: 1, to: member, group: &group, now: now, holdsKey: false))
                    group.cursors[partition] += 1
                }
            }
            for (member, deliveries) in outgoing {
                if group.members[member]?.buffer.push(deliveries) != true {
                    // The member left meanwhile: everything just handed to it goes back for redelivery.
                    for delivery in deliveries {
                        let position = Position(partition: delivery.partition, offset: delivery.offset)
                        if let pending = group.pending.removeValue(forKey: position) {
                            group.redeliveries.append(
                                Redelivery(due: now, position: position, attempt: pending.attempt))
                        }
                    }
                }
            }
        }
    }

    private func pickMember(_ group: inout Group) -> Int? {
        let count = group.memberOrder.count
        for step in 0..<count {
            let member = group.memberOrder[(group.nextMember + step) % count]
            if let candidate = group.members[member], candidate.inFlight < group.options.maxInFlight {
                group.nextMember = (group.nextMember + step + 1) % count
                return member
            }
        }
        return nil
    }

    private func deliver(
        _ event: CloudEvent, at position: Position, attempt: Int, to member: Int, group: inout Group, now: UInt64,
        holdsKey: Bool
    ) -> Delivery {
        let key = group.options.ordered ? event.partitionkey : nil
        if let key, !holdsKey { group.busyKeys[key, default: 0] += 1 }
        group.pending[position] = Pending(
            attempt: attempt, deadline: now + UInt64(max(0, group.options.ackWait.nanoseconds)), member: member,
            key: key)
        group.members[member]!.inFlight += 1
        group.delivered += 1
        return Delivery(
            event: event, attempt: attempt, partition: position.partition, offset: position.offset,
            settler: group.members[member]!.settler)
    }

    private func memberLeft(topic name: String, group groupName: String, member: Int) {
        state.withLock { state in
            guard var topic = state.topics.removeValue(forKey: name) else { return }
            defer { state.topics[name] = topic }
            guard var group = topic.groups.removeValue(forKey: groupName) else { return }
            group.members.removeValue(forKey: member)
            group.memberOrder.removeAll { $0 == member }
            // Its unsettled deliveries stay pending: it may still settle them, and the ack wait hands any it does
            // not settle to the other members.
            topic.groups[groupName] = group
        }
    }

    // MARK: Settling

    func settle(_ delivery: Delivery, _ settlement: Settlement, topic name: String, group groupName: String) throws {
        try state.withLock { state throws(TransportError) in
            let position = Position(partition: delivery.partition, offset: delivery.offset)
            // Take the topic and group out first (no copy left behind to make the mutations below copy-on-write).
            let now = monotonicNanoseconds()
            guard var topic = state.topics.removeValue(forKey: name) else {
                throw TransportError(.staleAck, "topic '\(name)' no longer exists")
            }
            guard var group = topic.groups.removeValue(forKey: groupName) else {
                state.topics[name] = topic
                throw TransportError(.staleAck, "group '\(groupName)' no longer exists")
            }
            guard let pending = group.pending[position], pending.attempt == delivery.attempt else {
                topic.groups[groupName] = group
                state.topics[name] = topic
                throw TransportError(
                    .staleAck,
                    "delivery \(delivery.partition)/\(delivery.offset) attempt \(delivery.attempt) is no longer pending"
                )
            }
            group.pending.removeValue(forKey: position)
            group.members[pending.member]?.inFlight -= 1
            var deadLetters: [CloudEvent] = []
            switch settlement {
            case .ack:
                release(pending.key, in: &group)
            case .nack(let delay):
                retryOrDeadLetter(
                    position, attempt: pending.attempt, key: pending.key, delay: delay,
                    reason: "nacked \(pending.attempt) times", topic: topic, group: &group, groupName: groupName,
                    now: now, deadLetters: &deadLetters)
            case .terminate(let reason):
                deadLetters.append(
                    deadLetter(
                        delivery.event, reason: "terminated: \(reason)", attempts: pending.attempt, key: pending.key,
                        group: &group, groupName: groupName))
            }
            topic.groups[groupName] = group
            state.topics[name] = topic
            publishDeadLetters(deadLetters, of: name, now: now, state: &state)
            pump(name, state: &state, now: now)
        }
    }

    struct Settler: DeliverySettler {
        weak var transport: InMemoryTransport?
        let topic: String
        let group: String

        func settle(_ delivery: Delivery, _ settlement: Settlement) async throws {
            guard let transport else { throw TransportError(.shutDown, "the transport is gone") }
            try transport.settle(delivery, settlement, topic: topic, group: group)
        }
    }

    // MARK: Inspection

    /// Every event stored in a topic, partition by partition.
    public func events(in topic: String) -> [CloudEvent] {
        state.withLock { $0.topics[topic]?.partitions.flatMap { $0 } ?? [] }
    }

    /// A consumer group's counters: events not yet delivered (lag), unsettled, redelivered, dead-lettered.
    public func groupStatus(topic: String, group: String) -> GroupStatus? {
        state.withLock { state in
            guard let topic = state.topics[topic], let group = topic.groups[group] else { return nil }
            let lag = zip(topic.partitions, group.cursors).reduce(0) { $0 + $1.0.count - Int($1.1) }
            return GroupStatus(
                lag: lag, pending: group.pending.count + group.redeliveries.count, redelivered: group.redelivered,
                deadLettered: group.deadLettered)
        }
    }

    public func shutdown() async {
        let (ticker, buffers) = state.withLock { state -> (Task<Void, Never>?, [DeliveryBuffer]) in
            state.closed = true
            defer { state.ticker = nil }
            let buffers = state.topics.values.flatMap { $0.groups.values.flatMap { $0.members.values.map(\.buffer) } }
            return (state.ticker, buffers)
        }
        ticker?.cancel()
        for buffer in buffers { buffer.finish() }
    }
}

/// A consumer group's state.
public struct GroupStatus: Sendable, Hashable {
    /// Events not yet delivered to the group.
    public let lag: Int
    /// Delivered and not settled, or waiting for redelivery.
    public let pending: Int
    public let redelivered: Int
    public let deadLettered: Int
}
