import DequeModule
import Foundation
import Herald
import HeraldLog
import HeraldWire
import Logging
import ServiceLifecycle
import Synchronization

extension Broker {
    /// Expires ack deadlines, releases due redeliveries, syncs the journal and applies retention.
    public func tick() {
        let now = monotonicNanoseconds()
        var durability: [(topic: String, waits: [(PartitionState, Int64)])] = []
        let (deliveries, logsToSync) = state.withLock { state -> ([Outgoing], [PartitionLog]) in
            var deliveries: [Outgoing] = []
            for topic in state.topics.values {
                var letters: [(GroupState, [(Position, Int, String)])] = []
                for group in topic.groups.values {
                    var groupLetters: [(Position, Int, String)] = []
                    for (position, pending) in group.pending where pending.deadline <= now {
                        group.pending.removeValue(forKey: position)
                        group.members[pending.member]?.inFlight -= 1
                        if pending.attempt >= Int(group.options.maxDeliveries) {
                            group.release(pending.key)
                            groupLetters.append(
                                (
                                    position, pending.attempt,
                                    "ack wait of \(group.options.ackWaitMilliseconds) ms expired"
                                ))
                        } else {
                            let backoff = group.options.backoffMilliseconds
                            let delay = backoff.isEmpty ? 0 : backoff[min(pending.attempt - 1, backoff.count - 1)]
                            group.redeliveries.append(
                                Redelivery(
                                    due: now + UInt64(delay) * 1_000_000, position: position, attempt: pending.attempt))
                        }
                    }
                    if !groupLetters.isEmpty { letters.append((group, groupLetters)) }
                }
                for (group, groupLetters) in letters {
                    var settled: [Position] = []
                    deadLetter(
                        groupLetters, topic: topic, group: group, now: now, state: &state, settled: &settled,
                        durability: &durability)
                    if !settled.isEmpty {
                        try? state.journal.append([.settled(topic: topic.name, group: group.name, positions: settled)])
                        state.journalDirty = true
                    }
                }
                let due = topic.groups.values.contains { group in
                    !group.memberOrder.isEmpty
                        && (group.redeliveries.contains { $0.due <= now }
                            || zip(group.cursors, topic.partitions).contains { $0.0 < $0.1.visible })
                }
                if due || !letters.isEmpty { pump(topic, now: now, into: &deliveries) }
            }
            let buffered = pendingJournal.withLock { entries -> [JournalEntry] in
                defer { entries = [] }
                return entries
            }
            if !buffered.isEmpty {
                try? state.journal.append(buffered)
                state.journalDirty = true
            }
            if now &- state.lastRetention > 10_000_000_000 {
                state.lastRetention = now
                enforceRetention(&state)
            }
            compactJournalIfNeeded(&state)
            var toSync: [PartitionLog] = []
            if state.journalDirty && configuration.fsync != .none { toSync.append(state.journal.log) }
            state.journalDirty = false
            // `fsync: interval`: every partition written since the last interval is synced now.
            if case .interval(let interval) = configuration.fsync,
                now &- state.lastIntervalSync >= UInt64(interval.nanoseconds)
            {
                state.lastIntervalSync = now
                for topic in state.topics.values {
                    for partition in topic.partitions where partition.log.durableOffset < partition.log.nextOffset {
                        toSync.append(partition.log)
                    }
                }
            }
            return (deliveries, toSync)
        }
        hand(deliveries)
        awaitDurability(durability)
        for log in logsToSync { commit.whenDurable(log, through: log.nextOffset) { _ in } }
    }

    func enforceRetention(_ state: inout State) {
        let now = Int64(wallClockMilliseconds())
        for topic in state.topics.values {
            for (index, partition) in topic.partitions.enumerated() {
                let start = partition.log.enforceRetention(nowMilliseconds: now)
                for group in topic.groups.values where group.cursors[index] < start {
                    group.cursors[index] = start
                }
            }
        }
    }

    /// Rewrites the journal as a snapshot of the current metadata once it has grown past the limit.
    func compactJournalIfNeeded(_ state: inout State) {
        // Past the limit, and at least twice what the last snapshot took (a snapshot larger than the limit must not
        // be rewritten on every tick).
        let size = state.journal.log.sizeInBytes
        guard size > configuration.journalCompactionBytes, size > 2 * state.journalSnapshotBytes else { return }
        do {
            state.journal = try state.journal.compacted(
                into: snapshot(state), dataDirectory: configuration.dataDirectory)
            state.journalSnapshotBytes = state.journal.log.sizeInBytes
        } catch {
            logger.error("journal compaction failed; the old journal stays", metadata: ["error": "\(error)"])
        }
    }

    /// The journal entries that recreate the current metadata.
    func snapshot(_ state: State) -> [JournalEntry] {
        var entries: [JournalEntry] = []
        for topic in state.topics.values {
            entries.append(
                .topicCreated(name: topic.name, partitions: topic.partitions.count, retention: topic.retention))
            for group in topic.groups.values {
                let floors = group.floors()
                entries.append(
                    .groupCreated(topic: topic.name, group: group.name, options: group.options, cursors: floors))
                var settled: [Position] = []
                let unsettled = group.unsettled()
                for partition in floors.indices {
                    for offset in floors[partition]..<group.cursors[partition] {
                        let position = Position(partition: partition, offset: offset)
                        if !unsettled.contains(position) { settled.append(position) }
                    }
                    for offset in group.settledAhead[partition] {
                        settled.append(Position(partition: partition, offset: offset))
                    }
                }
                if !settled.isEmpty {
                    entries.append(.settled(topic: topic.name, group: group.name, positions: settled))
                }
                // Attempt 1 is what an unrecorded delivery counts as; only later attempts need a record.
                for (position, pending) in group.pending where pending.attempt > 1 {
                    entries.append(
                        .attempt(topic: topic.name, group: group.name, position: position, attempt: pending.attempt))
                }
                for redelivery in group.redeliveries where redelivery.attempt > 0 {
                    entries.append(
                        .attempt(
                            topic: topic.name, group: group.name, position: redelivery.position,
                            attempt: redelivery.attempt))
                }
                for (position, attempt) in group.priorAttempts {
                    entries.append(.attempt(topic: topic.name, group: group.name, position: position, attempt: attempt))
                }
            }
        }
        return entries
    }
}
