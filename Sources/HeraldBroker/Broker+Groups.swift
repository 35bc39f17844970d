import Herald
import HeraldWire
import Synchronization

/// How a consumer group behaves, as the HTTP API's `PUT .../groups/{group}` sets it.
public struct GroupSettings: Sendable, Hashable {
    /// Where a new group starts (ignored when the group exists).
    public var start: WireStart
    public var ackWaitMilliseconds: UInt32
    public var maxDeliveries: UInt32
    /// Delay before redelivery, per failed attempt (the last repeats); empty redelivers at once.
    public var backoffMilliseconds: [UInt32]
    public var ordered: Bool
    /// A push group: each event is POSTed to this URL.
    public var pushURL: String?

    public init(
        start: WireStart = .earliest, ackWaitMilliseconds: UInt32 = 30_000, maxDeliveries: UInt32 = 5,
        backoffMilliseconds: [UInt32] = [1000, 5000, 30_000], ordered: Bool = false, pushURL: String? = nil
    ) {
        self.start = start
        self.ackWaitMilliseconds = ackWaitMilliseconds
        self.maxDeliveries = maxDeliveries
        self.backoffMilliseconds = backoffMilliseconds
        self.ordered = ordered
        self.pushURL = pushURL
    }

    /// A subscription to `group` with these settings (they apply only if the subscribe creates the group).
    public func subscribeRequest(topic: String, group: String, maxInFlight: UInt32) -> SubscribeRequest {
        SubscribeRequest(
            topic: topic, group: group, start: start, ackWaitMilliseconds: ackWaitMilliseconds,
            maxDeliveries: maxDeliveries, backoffMilliseconds: backoffMilliseconds, ordered: ordered,
            maxInFlight: maxInFlight)
    }

    var options: GroupOptions {
        GroupOptions(
            ackWaitMilliseconds: max(1, ackWaitMilliseconds), maxDeliveries: maxDeliveries,
            backoffMilliseconds: backoffMilliseconds, ordered: ordered, pushURL: pushURL)
    }
}

/// A push group the HTTP server should serve.
public struct PushGroup: Sendable, Hashable {
    public var topic: String
    public var group: String
    public var url: String
    public var backoffMilliseconds: [UInt32]
}

extension Broker {
    /// Creates a consumer group without a member, or changes the options of an existing one. Returns the group
    /// and whether it was created.
    public func configureGroup(topic: String, group: String, _ settings: GroupSettings) throws(BrokerError)
        -> (info: GroupInfo, created: Bool)
    {
        try Broker.validateName(topic, what: "topic")
        try Broker.validateName(group, what: "group")
        guard settings.maxDeliveries >= 1 else { throw BrokerError(.invalidRequest, "maxDeliver must be at least 1") }
        return try state.withLock { state throws(BrokerError) in
            let topicState = try topicLocked(topic, state: &state)
            if let existing = topicState.groups[group] {
                existing.options = settings.options
                do {
                    try state.journal.append([.groupConfigured(topic: topic, group: group, options: existing.options)])
                } catch {
                    throw BrokerError(.storage, "cannot record the group's options: \(error)")
                }
                state.journalDirty = true
                return (groupInfo(topicState, existing), false)
            }
            let request = settings.subscribeRequest(topic: topic, group: group, maxInFlight: 1)
            let created = try groupLocked(topicState, request, state: &state, pushURL: settings.pushURL)
            return (groupInfo(topicState, created), true)
        }
    }

    /// One group's counters and options, or nil.
    public func group(topic: String, group: String) -> GroupInfo? {
        state.withLock { state in
            guard let topicState = state.topics[topic], let groupState = topicState.groups[group] else { return nil }
            return groupInfo(topicState, groupState)
        }
    }

    /// Every push group, for the server that pushes.
    public func pushGroups() -> [PushGroup] {
        state.withLock { state in
            state.topics.values.flatMap { topic in
                topic.groups.values.compactMap { group in
                    group.options.pushURL.map {
                        PushGroup(
                            topic: topic.name, group: group.name, url: $0,
                            backoffMilliseconds: group.options.backoffMilliseconds)
                    }
                }
            }
        }
    }

    /// Settles deliveries of a group by position and attempt, whoever holds them (the HTTP API's ack and nack:
    /// the ack id names the delivery, not the connection). Returns, per item, whether it was stale.
    public func settle(topic: String, group: String, _ items: [SettleItem]) -> [Bool] {
        let holder = state.withLock { state -> Int? in
            guard let groupState = state.topics[topic]?.groups[group] else { return nil }
            for item in items {
                let position = Position(partition: Int(item.partition), offset: item.offset)
                if let pending = groupState.pending[position] { return pending.member }
            }
            return nil
        }
        guard let holder else { return Array(repeating: true, count: items.count) }
        return settle(member: holder, items)
    }

    /// Lets a member hold `credit` more unsettled deliveries than it holds now (a pull asking for N), and
    /// delivers at once what is waiting. A credit of 0 stops deliveries to it until the next grant.
    public func grant(member id: Int, credit: Int) {
        let deliveries = state.withLock { state -> [Outgoing] in
            guard let (topicName, groupName) = state.memberGroups[id], let topic = state.topics[topicName],
                let group = topic.groups[groupName], var slot = group.members[id]
            else { return [] }
            slot.maxInFlight = slot.inFlight + max(0, credit)
            group.members[id] = slot
            var deliveries: [Outgoing] = []
            if credit > 0 { pump(topic, now: monotonicNanoseconds(), into: &deliveries) }
            return deliveries
        }
        hand(deliveries)
    }
}
