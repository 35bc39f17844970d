import DequeModule
import Foundation
import Herald
import HeraldLog
import HeraldWire
import Logging
import ServiceLifecycle
import Synchronization

extension Broker {
    /// Joins (creating if needed) consumer group `request.group` on `request.topic`. Returns the member id.
    public func subscribe(_ request: SubscribeRequest, member: any BrokerMember) throws(BrokerError) -> Int {
        try Broker.validateName(request.topic, what: "topic")
        try Broker.validateName(request.group, what: "group")
        guard request.maxDeliveries >= 1, request.maxInFlight >= 1 else {
            throw BrokerError(.invalidRequest, "maxDeliveries and maxInFlight must be at least 1")
        }
        let (id, deliveries) = try state.withLock { state throws(BrokerError) -> (Int, [Outgoing]) in
            let topic = try topicLocked(request.topic, state: &state)
            let group = try groupLocked(topic, request, state: &state)
            state.nextMemberID += 1
            let id = state.nextMemberID
            group.members[id] = MemberSlot(member: member, maxInFlight: Int(request.maxInFlight))
            group.memberOrder.append(id)
            state.memberGroups[id] = (request.topic, request.group)
            var deliveries: [Outgoing] = []
            pump(topic, now: monotonicNanoseconds(), into: &deliveries)
            return (id, deliveries)
        }
        hand(deliveries)
        return id
    }

    func groupLocked(_ topic: TopicState, _ request: SubscribeRequest, state: inout State, pushURL: String? = nil)
        throws(BrokerError) -> GroupState
    {
        if let group = topic.groups[request.group] { return group }
        var cursors: [Int64] = []
        for partition in topic.partitions {
            switch request.start {
            case .earliest: cursors.append(partition.log.startOffset)
            case .latest: cursors.append(partition.log.nextOffset)
            case .offset(let offset):
                cursors.append(min(max(offset, partition.log.startOffset), partition.log.nextOffset))
            case .time(let milliseconds):
                do {
                    cursors.append(try partition.log.offset(atOrAfter: milliseconds))
                } catch {
                    throw BrokerError(.storage, "cannot find the start time: \(error.message)")
                }
            }
        }
        let options = GroupOptions(
            ackWaitMilliseconds: max(1, request.ackWaitMilliseconds), maxDeliveries: request.maxDeliveries,
            backoffMilliseconds: request.backoffMilliseconds, ordered: request.ordered, pushURL: pushURL)
        let group = GroupState(name: request.group, options: options, cursors: cursors)
        do {
            try state.journal.append([
                .groupCreated(topic: topic.name, group: request.group, options: options, cursors: cursors)
            ])
        } catch {
            throw BrokerError(.storage, "cannot record the new group: \(error.message)")
        }
        state.journalDirty = true
        topic.groups[request.group] = group
        return group
    }

    /// A member leaves its group. With `keepPending` (an unsubscribe) it gets nothing new but may still settle
    /// what it holds, and the ack wait hands on what it does not settle; without (a lost connection) its unsettled
    /// deliveries are redelivered to the others right away.
    public func unsubscribe(member id: Int, keepPending: Bool = false) {
        let deliveries = state.withLock { state -> [Outgoing] in
            guard let (topicName, groupName) = state.memberGroups[id],
                let topic = state.topics[topicName], let group = topic.groups[groupName]
            else { return [] }
            group.members.removeValue(forKey: id)
            group.memberOrder.removeAll { $0 == id }
            if keepPending { return [] }
            state.memberGroups.removeValue(forKey: id)
            let now = monotonicNanoseconds()
            for (position, pending) in group.pending where pending.member == id {
                group.pending.removeValue(forKey: position)
                group.redeliveries.append(Redelivery(due: now, position: position, attempt: pending.attempt))
            }
            var deliveries: [Outgoing] = []
            pump(topic, now: now, into: &deliveries)
            return deliveries
        }
        hand(deliveries)
    }

    /// Settles deliveries of a member; returns, per item, whether it was stale (not pending with that attempt).
    public func settle(member id: Int, _ items: [SettleItem]) -> [Bool] {
        var durability: [(topic: String, waits: [(PartitionState, Int64)])] = []
        let (stale, deliveries) = state.withLock { state -> ([Bool], [Outgoing]) in
            guard let (topicName, groupName) = state.memberGroups[id], let topic = state.topics[topicName],
                let group = topic.groups[groupName]
            else { return (Array(repeating: true, count: items.count), []) }
            let now = monotonicNanoseconds()
            var stale: [Bool] = []
            stale.reserveCapacity(items.count)
            var settled: [Position] = []
            var letters: [(Position, Int, String)] = []
            for item in items {
                let position = Position(partition: Int(item.partition), offset: item.offset)
                guard let pending = group.pending[position], pending.attempt == Int(item.attempt) else {
                    stale.append(true)
                    continue
                }
                stale.append(false)
                group.pending.removeValue(forKey: position)
                group.members[pending.member]?.inFlight -= 1
                switch item.settlement {
                case .ack:
                    group.release(pending.key)
                    group.acked += 1
                    settled.append(position)
                case .nack(let delay):
                    if pending.attempt >= Int(group.options.maxDeliveries) {
                        letters.append((position, pending.attempt, "nacked \(pending.attempt) times"))
                        group.release(pending.key)
                    } else {
                        group.redeliveries.append(
                            Redelivery(
                                due: now + UInt64(delay) * 1_000_000, position: position, attempt: pending.attempt))
                    }
                case .terminate(let reason):
                    letters.append((position, pending.attempt, "terminated: \(reason)"))
                    group.release(pending.key)
                }
            }
            deadLetter(
                letters, topic: topic, group: group, now: now, state: &state, settled: &settled,
                durability: &durability)
            if !settled.isEmpty {
                try? state.journal.append([.settled(topic: topicName, group: groupName, positions: settled)])
                state.journalDirty = true
            }
            var deliveries: [Outgoing] = []
            pump(topic, now: now, into: &deliveries)
            return (stale, deliveries)
        }
        hand(deliveries)
        awaitDurability(durability)
        return stale
    }

    /// Appends dead letters (the event with `deadletterreason`, `deliveryattempts`, `deadlettergroup` and
    /// `deadletterposition`) to `<topic>.dlq`. Dedup there is by (source, id, group, position), so a retry of the
    /// same dead-lettering after a crash returns the first letter, while a replayed event that fails again gets a
    /// letter of its own. A position counts as settled only once its letter is written; if the dead-letter topic
    /// cannot take it, it goes back for redelivery (and is dead-lettered again when that fails). `durability`
    /// collects what the caller must wait for after releasing the lock.
    func deadLetter(
        _ letters: [(Position, Int, String)], topic: TopicState, group: GroupState, now: UInt64, state: inout State,
        settled: inout [Position], durability: inout [(topic: String, waits: [(PartitionState, Int64)])]
    ) {
        guard !letters.isEmpty else { return }
        var events: [WireEvent] = []
        var summaries: [EventSummary] = []
        var keys: [String] = []
        var written: [(position: Position, attempts: Int)] = []
        for (position, attempts, reason) in letters {
            guard
                let record = try? topic.partitions[position.partition].log.read(from: position.offset, maxRecords: 1)
                    .first, record.offset == position.offset
            else {
                // Deleted by retention meanwhile: there is nothing left to dead-letter.
                settled.append(position)
                continue
            }
            var wire = WireEvent(headers: record.headers, data: record.payload)
            if var event = try? BinaryEvent.decode(wire) {
                event.extensions["deadletterreason"] = .string(reason)
                event.extensions["deliveryattempts"] = .integer(Int32(clamping: attempts))
                event.extensions["deadlettergroup"] = .string(group.name)
                event.extensions["deadletterposition"] = .string("\(position.partition)/\(position.offset)")
                if let encoded = try? BinaryEvent.encode(event) { wire = encoded }
            }
            guard let summary = try? BinaryEvent.summary(wire.headers) else {
                settled.append(position)  // it was checked on publish; unreachable in practice
                continue
            }
            events.append(wire)
            summaries.append(summary)
            keys.append(Broker.deadLetterKey(group: group.name, position: "\(position.partition)/\(position.offset)"))
            written.append((position, attempts))
        }
        guard !events.isEmpty else { return }
        do {
            let dlq = try topicLocked(topic.name + ".dlq", partitions: 1, state: &state)
            let (_, waits) = try appendLocked(
                dlq, events, summaries, dedupGroup: { keys[$0] }, bypassDedup: false)
            settled += written.map(\.position)
            group.deadLettered += written.count
            if configuration.fsync == .always {
                durability.append((dlq.name, waits))
            } else {
                for (partition, _) in waits { partition.visible = partition.log.nextOffset }
            }
        } catch {
            logger.error(
                "could not write dead letters; they will be delivered again",
                metadata: ["topic": "\(topic.name)", "error": "\(error)"])
            for (position, attempts) in written {
                group.redeliveries.append(Redelivery(due: now + 1_000_000_000, position: position, attempt: attempts))
            }
        }
    }

    /// The dead-letter topic's dedup group for a letter: the consumer group and the original position.
    static func deadLetterKey(group: String, position: String) -> String { "\(group)@\(position)" }

    /// Waits (off the lock) for dead letters to become durable, then shows them to the dead-letter topic's groups.
    func awaitDurability(_ durability: [(topic: String, waits: [(PartitionState, Int64)])]) {
        for (topic, waits) in durability { whenDurable(waits, topic: topic) { _ in } }
    }

    /// Hands what each member of each group has room for: due redeliveries first, then new records.
    func pump(_ topic: TopicState, now: UInt64, into outgoing: inout [Outgoing]) {
        var attemptsToRecord: [JournalEntry] = []
        for group in topic.groups.values where !group.memberOrder.isEmpty {
            var batches: [Int: [WireDelivery]] = [:]
            if !group.redeliveries.isEmpty {
                group.redeliveries.sort { ($0.due, $0.position) < ($1.due, $1.position) }
                var remaining: [Redelivery] = []
                for redelivery in group.redeliveries {
                    guard redelivery.due <= now, let member = group.pickMember(),
                        let record = try? topic.partitions[redelivery.position.partition].log.read(
                            from: redelivery.position.offset, maxRecords: 1
                        ).first
                    else {
                        remaining.append(redelivery)
                        continue
                    }
                    let attempt = redelivery.attempt + 1
                    batches[member, default: []].append(
                        deliver(record, at: redelivery.position, attempt: attempt, to: member, group: group, now: now))
                    if attempt > 1 {
                        attemptsToRecord.append(
                            .attempt(
                                topic: topic.name, group: group.name, position: redelivery.position, attempt: attempt))
                        group.redelivered += 1
                    }
                }
                group.redeliveries = remaining
            }
            partitions: for (index, partition) in topic.partitions.enumerated() {
                while group.cursors[index] < partition.visible {
                    guard group.pickMember() != nil else { break partitions }
                    let records: [LogRecord]
                    do {
                        records = try partition.log.read(
                            from: group.cursors[index], upTo: partition.visible, maxRecords: 256, maxBytes: 256 << 10)
                    } catch let error where error.code == .offsetOutOfRange {
                        group.cursors[index] = partition.log.startOffset
                        continue
                    } catch {
                        logger.error("cannot read a partition", metadata: ["error": "\(error)"])
                        break
                    }
                    guard !records.isEmpty else { break }
                    for record in records {
                        let position = Position(partition: index, offset: record.offset)
                        if group.settledAhead[index].remove(record.offset) != nil {
                            group.cursors[index] = record.offset + 1
                            continue
                        }
                        if group.options.ordered, let key = record.key.map({ String(decoding: $0, as: UTF8.self) }),
                            group.busyKeys[key] != nil
                        {
                            // Park it behind its key and let other keys pass (bounded; past the bound the
                            // partition waits for the key instead).
                            guard group.parkedCount < Broker.maxParkedPerGroup else { continue partitions }
                            group.parked[key, default: []].append(position)
                            group.parkedCount += 1
                            group.cursors[index] = record.offset + 1
                            continue
                        }
                        guard let member = group.pickMember() else { break partitions }
                        let attempt = (group.priorAttempts.removeValue(forKey: position) ?? 0) + 1
                        if group.options.ordered, let key = record.key {
                            group.busyKeys[String(decoding: key, as: UTF8.self), default: 0] += 1
                        }
                        batches[member, default: []].append(
                            deliver(record, at: position, attempt: attempt, to: member, group: group, now: now))
                        if attempt > 1 {
                            attemptsToRecord.append(
                                .attempt(topic: topic.name, group: group.name, position: position, attempt: attempt))
                        }
                        group.cursors[index] = record.offset + 1
                    }
                }
            }
            for (member, deliveries) in batches {
                if let slot = group.members[member] { outgoing.append((slot.member, deliveries)) }
            }
        }
        if !attemptsToRecord.isEmpty {
            bufferJournal(attemptsToRecord)
        }
    }

    /// Pending entries hold the key in ordered mode; the caller has counted the key busy already.
    func deliver(
        _ record: LogRecord, at position: Position, attempt: Int, to member: Int, group: GroupState, now: UInt64
    ) -> WireDelivery {
        let key = group.options.ordered ? record.key.map { String(decoding: $0, as: UTF8.self) } : nil
        group.pending[position] = Pending(
            attempt: attempt, deadline: now + UInt64(group.options.ackWaitMilliseconds) * 1_000_000, member: member,
            key: key)
        group.members[member]!.inFlight += 1
        group.delivered += 1
        return WireDelivery(
            partition: UInt32(position.partition), offset: position.offset, attempt: UInt32(attempt),
            event: WireEvent(headers: record.headers, data: record.payload))
    }

    func bufferJournal(_ entries: [JournalEntry]) {
        pendingJournal.withLock { $0.append(contentsOf: entries) }
    }

    /// Gives deliveries to their members (outside the lock); a member that is gone gets them redelivered.
    func hand(_ outgoing: [Outgoing]) {
        // A member whose connection closed meanwhile refuses them; its unsubscribe redelivers all it held.
        for (member, deliveries) in outgoing { _ = member.deliver(deliveries) }
    }
}
