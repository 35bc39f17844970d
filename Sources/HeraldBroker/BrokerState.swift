import DequeModule
import HeraldLog
import HeraldWire

/// A consumer of deliveries: a TCP subscription, an embedded subscriber. Called outside the broker's lock.
public protocol BrokerMember: AnyObject, Sendable {
    /// Hands deliveries over; false when the member is gone (they are then redelivered to others).
    func deliver(_ deliveries: [WireDelivery]) -> Bool
    /// False while the member's outbound buffer is full (a slow consumer): the broker pauses delivering to it.
    var canAcceptDeliveries: Bool { get }
}

/// One partition of a topic: its log and how far consumers may read.
///
/// `@unchecked Sendable`: `log` is Sendable and never changes; `visible` and `unacknowledged` are read and written
/// only under the broker's lock (publish completions that run on the sync thread take it first).
final class PartitionState: @unchecked Sendable {
    let log: PartitionLog
    /// Offsets below this are visible to consumers (durable under `fsync: always`, written otherwise).
    var visible: Int64
    /// Records appended and not yet acknowledged to their publishers (overload protection).
    var unacknowledged = 0

    init(log: PartitionLog) {
        self.log = log
        self.visible = log.nextOffset
    }
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
    /// The attempt that failed (the redelivery is attempt + 1).
    let attempt: Int
}

struct MemberSlot {
    let member: any BrokerMember
    /// Deliveries the member may hold unsettled; a pull member's grows with each pull (`grant`).
    var maxInFlight: Int
    var inFlight = 0
}

/// A consumer group's state, guarded by the broker's lock.
final class GroupState {
    let name: String
    var options: GroupOptions
    /// The next offset never yet delivered, per partition.
    var cursors: [Int64]
    /// Offsets at or after the cursor that were settled before a restart: skipped when reached.
    var settledAhead: [Set<Int64>]
    /// Attempts recorded before a restart, by position (so max-deliveries holds across restarts).
    var priorAttempts: [Position: Int] = [:]
    var pending: [Position: Pending] = [:]
    var redeliveries: [Redelivery] = []
    var busyKeys: [String: Int] = [:]
    /// Ordered mode: records whose key was busy when the cursor passed them, in offset order per key. They go out
    /// one at a time as their key frees, so other keys keep flowing past a slow one.
    var parked: [String: Deque<Position>] = [:]
    var parkedCount = 0
    var members: [Int: MemberSlot] = [:]
    var memberOrder: [Int] = []
    var nextMember = 0
    var delivered = 0
    var redelivered = 0
    var deadLettered = 0
    var acked = 0

    init(name: String, options: GroupOptions, cursors: [Int64]) {
        self.name = name
        self.options = options
        self.cursors = cursors
        self.settledAhead = Array(repeating: [], count: cursors.count)
    }

    /// The lowest offset per partition that is not settled for good: what a snapshot keeps as the cursor.
    func floors() -> [Int64] {
        var floors = cursors
        for position in pending.keys where position.offset < floors[position.partition] {
            floors[position.partition] = position.offset
        }
        for redelivery in redeliveries where redelivery.position.offset < floors[redelivery.position.partition] {
            floors[redelivery.position.partition] = redelivery.position.offset
        }
        for positions in parked.values {
            for position in positions where position.offset < floors[position.partition] {
                floors[position.partition] = position.offset
            }
        }
        return floors
    }

    /// Positions delivered or waiting but not settled for good.
    func unsettled() -> Set<Position> {
        var positions = Set(pending.keys)
        for redelivery in redeliveries { positions.insert(redelivery.position) }
        for queue in parked.values { positions.formUnion(queue) }
        return positions
    }

    func pickMember() -> Int? {
        let count = memberOrder.count
        for step in 0..<count {
            let id = memberOrder[(nextMember + step) % count]
            if let slot = members[id], slot.inFlight < slot.maxInFlight, slot.member.canAcceptDeliveries {
                nextMember = (nextMember + step + 1) % count
                return id
            }
        }
        return nil
    }

    /// A delivery of `key` settled for good: the key's next parked record (if any) goes out next, keeping the
    /// key busy; otherwise the key is free.
    func release(_ key: String?) {
        guard let key, let count = busyKeys[key] else { return }
        if count > 1 {
            busyKeys[key] = count - 1
        } else if let next = parked[key]?.popFirst() {
            parkedCount -= 1
            if parked[key]!.isEmpty { parked.removeValue(forKey: key) }
            redeliveries.append(
                Redelivery(due: 0, position: next, attempt: priorAttempts.removeValue(forKey: next) ?? 0))
        } else {
            busyKeys.removeValue(forKey: key)
        }
    }
}

/// (`source`, `id`) → where the event landed, for the dedup window.
struct DedupTable {
    struct Entry {
        let position: Position
        let at: UInt64
    }

    /// An event's identity for dedup; dead letters also by the group that gave up on them.
    struct Key: Hashable {
        let source: String
        let id: String
        let group: String?
    }

    var entries: [Key: Entry] = [:]
    var order = Deque<(Key, UInt64)>()

    static func key(source: String, id: String, group: String?) -> Key {
        Key(source: source, id: id, group: group)
    }

    mutating func expire(now: UInt64, window: UInt64) {
        while let (key, at) = order.first, now &- at > window {
            order.removeFirst()
            if entries[key]?.at == at { entries.removeValue(forKey: key) }
        }
    }

    mutating func insert(_ key: Key, _ position: Position, at: UInt64) {
        entries[key] = Entry(position: position, at: at)
        order.append((key, at))
    }
}

final class TopicState {
    let name: String
    var retention: TopicRetention
    var partitions: [PartitionState]
    var groups: [String: GroupState] = [:]
    var dedup = DedupTable()
    var roundRobin = 0

    init(name: String, retention: TopicRetention, partitions: [PartitionState]) {
        self.name = name
        self.retention = retention
        self.partitions = partitions
    }
}

/// A consumer group's counters, as `herald groups` shows them.
public struct GroupInfo: Sendable, Hashable, Codable {
    public var topic: String
    public var group: String
    /// Events not yet delivered to the group.
    public var lag: Int64
    /// Delivered and unsettled, or waiting for redelivery.
    public var pending: Int
    public var delivered: Int
    public var redelivered: Int
    public var deadLettered: Int
    public var acked: Int
    public var members: Int
    public var ackWaitMs: UInt32
    public var maxDeliver: UInt32
    public var backoffMs: [UInt32]
    public var ordered: Bool
    /// Set for a push group.
    public var pushURL: String?
}

/// A topic's shape, as `herald topics` shows it.
public struct TopicInfo: Sendable, Hashable, Codable {
    public var name: String
    public var partitions: Int
    /// Per partition: the first and the next offset.
    public var startOffsets: [Int64]
    public var endOffsets: [Int64]
    /// Per partition: every record below this offset is on disk.
    public var durableOffsets: [Int64]
    /// Retention: sealed segments older than this many seconds, or beyond this many bytes per partition, go.
    public var retentionSeconds: Int64?
    public var retentionBytes: Int?
    public var bytes: Int
    public var groups: [String]
}
