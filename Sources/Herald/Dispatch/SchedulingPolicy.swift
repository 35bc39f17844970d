import DequeModule

/// The pure scheduling state of one strategy: which queued item goes to which worker next. A `WorkerPool` owns
/// one behind its lock and executes what it decides, so each policy is testable without any concurrency.
protocol SchedulingPolicy: Sendable {
    var workerCount: Int { get }
    /// Items accepted and not yet taken by a worker (parked items excluded).
    var queuedCount: Int { get }
    /// Whether a failed item's partition key is parked instead of the item being dead-lettered.
    var parksFailures: Bool { get }
    /// Accepts an item; says which worker to wake.
    mutating func enqueue(_ item: WorkItem, now: UInt64) -> EnqueueDecision
    /// Moves up to `max` items for `worker` into `batch`, in the order they must run (a queue that is the worker's
    /// alone may be handed over whole, by swapping it with the empty batch). Returns a monotonic deadline when items
    /// are held back until then (event-time), else nil.
    mutating func take(worker: Int, max: Int, now: UInt64, into batch: inout Deque<WorkItem>) -> UInt64?
    /// Whether `worker` has queued items it could take (or that are held for it).
    func hasWork(worker: Int) -> Bool
    /// `worker` finished `count` items.
    mutating func completed(worker: Int, count: Int)
    /// Release every held item at the next `take` (used when draining).
    mutating func flush()
    /// Parks a failed item's key (partitioned strategy); later items with that key are held.
    mutating func park(_ item: WorkItem)
    /// Parks the item if its key is parked already (the worker holds back the rest of its batch for that key);
    /// returns whether it did.
    mutating func parkIfKeyParked(_ item: WorkItem) -> Bool
    /// Parked keys and how many items each holds.
    var parkedKeys: [String: Int] { get }
    /// Unparks a key: its items run again, failed one first. Returns the worker to wake.
    mutating func resume(key: String) -> Int?
    /// Unparks a key and returns its held items for the caller to dead-letter.
    mutating func discard(key: String) -> [WorkItem]
}

enum EnqueueDecision: Equatable {
    case wake(Int)
    case wakeAny
    /// The item was held with its parked key (partitioned): it does not count as outstanding work.
    case parked
    /// The item was not queued: it is late (event-time with `.deadLetter`).
    case late
}

extension SchedulingPolicy {
    var parksFailures: Bool { false }
    mutating func completed(worker: Int, count: Int) {}
    mutating func flush() {}
    mutating func park(_ item: WorkItem) {}
    mutating func parkIfKeyParked(_ item: WorkItem) -> Bool { false }
    var parkedKeys: [String: Int] { [:] }
    mutating func resume(key: String) -> Int? { nil }
    mutating func discard(key: String) -> [WorkItem] { [] }
}

/// One shared FIFO queue; any worker takes the next batch. Also `sequential` with one worker.
struct FIFOPolicy: SchedulingPolicy {
    let workerCount: Int
    var queue = Deque<WorkItem>()

    init(workers: Int) {
        workerCount = max(1, workers)
    }

    var queuedCount: Int { queue.count }
    func hasWork(worker: Int) -> Bool { !queue.isEmpty }

    mutating func enqueue(_ item: WorkItem, now: UInt64) -> EnqueueDecision {
        queue.append(item)
        return .wakeAny
    }

    mutating func take(worker: Int, max: Int, now: UInt64, into batch: inout Deque<WorkItem>) -> UInt64? {
        if workerCount == 1 && batch.isEmpty {
            // The whole queue at once, in O(1) under the lock.
            swap(&batch, &queue)
            return nil
        }
        // With several workers, split what is queued so one worker does not take everything.
        let share = Swift.max(1, Swift.min(max, queue.count / workerCount + 1))
        while batch.count < share, let item = queue.popFirst() { batch.append(item) }
        return nil
    }
}

/// A binary heap by (priority descending, sequence ascending).
struct PriorityPolicy: SchedulingPolicy {
    let workerCount: Int
    var heap = Heap<WorkItem> { lhs, rhs in
        lhs.priority != rhs.priority ? lhs.priority > rhs.priority : lhs.sequence < rhs.sequence
    }

    init(workers: Int) {
        workerCount = max(1, workers)
    }

    var queuedCount: Int { heap.count }
    func hasWork(worker: Int) -> Bool { !heap.isEmpty }

    mutating func enqueue(_ item: WorkItem, now: UInt64) -> EnqueueDecision {
        heap.insert(item)
        return .wakeAny
    }

    mutating func take(worker: Int, max: Int, now: UInt64, into batch: inout Deque<WorkItem>) -> UInt64? {
        // Small batches keep a late-arriving high-priority event from waiting behind a long batch.
        let limit = Swift.min(max, 8)
        while batch.count < limit, let item = heap.popFirst() { batch.append(item) }
        return nil
    }
}

/// Reorders by event time behind a watermark; one worker.
struct EventTimePolicy: SchedulingPolicy {
    let workerCount = 1
    let lateness: Int64
    let maxHold: UInt64
    let latePolicy: LateEventPolicy
    var heap = Heap<WorkItem> { lhs, rhs in
        let left = lhs.event.time?.nanosecondsSinceEpoch ?? 0
        let right = rhs.event.time?.nanosecondsSinceEpoch ?? 0
        return left != right ? left < right : lhs.sequence < rhs.sequence
    }
    /// The latest event time seen.
    var maxSeen: Int64 = .min
    /// The event time of the last released item; anything older is late.
    var lastReleased: Int64 = .min
    var flushing = false

    init(lateness: Duration, maxHold: Duration, latePolicy: LateEventPolicy) {
        self.lateness = lateness.nanoseconds
        self.maxHold = UInt64(max(0, maxHold.nanoseconds))
        self.latePolicy = latePolicy
    }

    var queuedCount: Int { heap.count }
    func hasWork(worker: Int) -> Bool { !heap.isEmpty }

    var watermark: Int64 { maxSeen == .min ? .min : maxSeen - lateness }

    mutating func enqueue(_ item: WorkItem, now: UInt64) -> EnqueueDecision {
        let time = item.event.time?.nanosecondsSinceEpoch ?? 0
        if time < lastReleased && latePolicy == .deadLetter { return .late }
        maxSeen = max(maxSeen, time)
        heap.insert(item)
        return .wake(0)
    }

    mutating func take(worker: Int, max: Int, now: UInt64, into batch: inout Deque<WorkItem>) -> UInt64? {
        while batch.count < max, let first = heap.first {
            let time = first.event.time?.nanosecondsSinceEpoch ?? 0
            let heldUntil = first.acceptedAt &+ maxHold
            // Late items (older than one released) go at once; others once the watermark or hold bound passes.
            if flushing || time <= watermark || time < lastReleased || heldUntil <= now {
                let item = heap.popFirst()!
                lastReleased = Swift.max(lastReleased, time)
                batch.append(item)
            } else {
                // The earliest deadline of any held item is the soonest something can be released by time.
                return heap.unordered.map { $0.acceptedAt &+ maxHold }.min()
            }
        }
        if heap.isEmpty { flushing = false }
        return nil
    }

    mutating func flush() { flushing = true }
}

/// N lanes by key hash, one worker each; failing keys may be parked.
struct PartitionedPolicy: SchedulingPolicy {
    let workerCount: Int
    let parksFailures: Bool
    var lanes: [Deque<WorkItem>]
    var parked: [String: Deque<WorkItem>] = [:]
    var roundRobin = 0
    var queuedCount = 0

    init(lanes: Int, parkFailingKeys: Bool) {
        workerCount = max(1, lanes)
        parksFailures = parkFailingKeys
        self.lanes = Array(repeating: Deque(), count: workerCount)
    }

    func hasWork(worker: Int) -> Bool { !lanes[worker].isEmpty }

    func lane(for item: WorkItem) -> Int? {
        guard let key = item.event.partitionkey else { return nil }
        return Int(PartitionHash.fnv1a(key) % UInt64(workerCount))
    }

    mutating func enqueue(_ item: WorkItem, now: UInt64) -> EnqueueDecision {
        if parkIfKeyParked(item) { return .parked }
        let index: Int
        if let keyed = lane(for: item) {
            index = keyed
        } else {
            index = roundRobin
            roundRobin = (roundRobin + 1) % workerCount
        }
        lanes[index].append(item)
        queuedCount += 1
        return .wake(index)
    }

    mutating func take(worker: Int, max: Int, now: UInt64, into batch: inout Deque<WorkItem>) -> UInt64? {
        if parked.isEmpty && batch.isEmpty {
            queuedCount -= lanes[worker].count
            swap(&batch, &lanes[worker])
            return nil
        }
        while batch.count < max, let item = lanes[worker].popFirst() {
            queuedCount -= 1
            if !parkIfKeyParked(item) { batch.append(item) }
        }
        return nil
    }

    mutating func park(_ item: WorkItem) {
        guard let key = item.event.partitionkey else { return }
        parked[key, default: Deque()].append(item)
    }

    mutating func parkIfKeyParked(_ item: WorkItem) -> Bool {
        guard let key = item.event.partitionkey, parked[key] != nil else { return false }
        parked[key]!.append(item)
        return true
    }

    var parkedKeys: [String: Int] { parked.mapValues(\.count) }

    mutating func resume(key: String) -> Int? {
        guard let items = parked.removeValue(forKey: key), let first = items.first else { return nil }
        let index = lane(for: first)!
        lanes[index].insert(contentsOf: items, at: 0)
        queuedCount += items.count
        return index
    }

    mutating func discard(key: String) -> [WorkItem] {
        Array(parked.removeValue(forKey: key) ?? [])
    }
}

/// Each worker has its own queue; an item goes to the worker with the fewest queued plus running items.
struct LeastLoadedPolicy: SchedulingPolicy {
    let workerCount: Int
    var queues: [Deque<WorkItem>]
    /// Queued plus running per worker.
    var load: [Int]
    var queuedCount = 0

    init(workers: Int) {
        workerCount = max(1, workers)
        queues = Array(repeating: Deque(), count: workerCount)
        load = Array(repeating: 0, count: workerCount)
    }

    mutating func enqueue(_ item: WorkItem, now: UInt64) -> EnqueueDecision {
        var best = 0
        for index in 1..<workerCount where load[index] < load[best] { best = index }
        queues[best].append(item)
        load[best] += 1
        queuedCount += 1
        return .wake(best)
    }

    mutating func take(worker: Int, max: Int, now: UInt64, into batch: inout Deque<WorkItem>) -> UInt64? {
        if batch.isEmpty {
            queuedCount -= queues[worker].count
            swap(&batch, &queues[worker])
            return nil
        }
        while batch.count < max, let item = queues[worker].popFirst() {
            queuedCount -= 1
            batch.append(item)
        }
        return nil
    }

    func hasWork(worker: Int) -> Bool { !queues[worker].isEmpty }

    mutating func completed(worker: Int, count: Int) {
        load[worker] -= count
    }
}

/// A stable 64-bit FNV-1a hash, so a key maps to the same lane in every process and run.
public enum PartitionHash {
    public static func fnv1a(_ key: String) -> UInt64 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in key.utf8 {
            hash ^= UInt64(byte)
            hash = hash &* 0x100_0000_01b3
        }
        return hash
    }

    /// The partition of an event among `count`: by its key's hash, or the next in turn (`roundRobin`) without one.
    public static func partition(forKey key: String?, count: Int, roundRobin: inout Int) -> Int {
        if let key { return Int(fnv1a(key) % UInt64(count)) }
        defer { roundRobin = (roundRobin + 1) % count }
        return roundRobin % count
    }
}

/// A minimal binary heap ordered by a comparison (`areInIncreasingOrder(a, b)`: a comes out first).
struct Heap<Element> {
    private(set) var unordered: [Element] = []
    let areInIncreasingOrder: (Element, Element) -> Bool

    init(_ areInIncreasingOrder: @escaping (Element, Element) -> Bool) {
        self.areInIncreasingOrder = areInIncreasingOrder
    }

    var count: Int { unordered.count }
    var isEmpty: Bool { unordered.isEmpty }
    var first: Element? { unordered.first }

    mutating func insert(_ element: Element) {
        unordered.append(element)
        var child = unordered.count - 1
        while child > 0 {
            let parent = (child - 1) / 2
            guard areInIncreasingOrder(unordered[child], unordered[parent]) else { break }
            unordered.swapAt(child, parent)
            child = parent
        }
    }

    mutating func popFirst() -> Element? {
        guard !unordered.isEmpty else { return nil }
        unordered.swapAt(0, unordered.count - 1)
        let top = unordered.removeLast()
        var parent = 0
        while true {
            let left = 2 * parent + 1
            let right = left + 1
            var best = parent
            if left < unordered.count && areInIncreasingOrder(unordered[left], unordered[best]) { best = left }
            if right < unordered.count && areInIncreasingOrder(unordered[right], unordered[best]) { best = right }
            if best == parent { break }
            unordered.swapAt(parent, best)
            parent = best
        }
        return top
    }
}

extension Heap: @unchecked Sendable where Element: Sendable {}
// Safe: the comparison closures are stateless literals; the heap is only used inside a lock.
