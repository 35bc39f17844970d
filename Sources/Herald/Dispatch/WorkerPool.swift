import DequeModule
import Synchronization

/// The scheduling engine every queued strategy shares: a lock-protected `SchedulingPolicy`, bounded capacity
/// with explicit back-pressure, N worker tasks that take items in batches (one lock round-trip per batch, not
/// per event), drain, and shutdown.
protocol WorkScheduler: Sendable {
    /// Takes the item if there is room, without waiting.
    func offer(_ item: WorkItem) -> OfferResult
    /// Takes a prefix of the items under one lock; returns how many were taken.
    func offer(contentsOf items: [WorkItem]) -> Int
    /// Takes the item, waiting for room or refusing per the back-pressure policy.
    func enqueue(_ item: WorkItem) async throws(EventBusError)
    func drain() async -> Bool
    func shutdown() async
    var parkedKeys: [String: Int] { get }
    /// Whether the calling task is one of this scheduler's workers (so waiting on it would wait on itself).
    var isCurrentWorker: Bool { get }
    func resume(key: String)
    func discard(key: String) async
}

/// Which pool's worker the current task is, if any.
enum WorkerIdentity {
    @TaskLocal static var pool: ObjectIdentifier?
}

final class WorkerPool<Policy: SchedulingPolicy>: WorkScheduler {
    struct State: ~Copyable {
        var policy: Policy
        var waiting: [CheckedContinuation<Void, Never>?]
        var workers: [Task<Void, Never>] = []
        /// Accepted and not finished; parked items excluded.
        var outstanding = 0
        var sequence: UInt64 = 0
        var drainWaiters: [CheckedContinuation<Void, Never>] = []
        var spaceWaiters = Deque<CheckedContinuation<Void, Never>>()
        var closed = false
        /// Runs the items; dropped after shutdown so the pool no longer holds the bus.
        var runner: (any WorkRunner)?
    }

    private let state: Mutex<State>
    private let capacity: Int
    private let backPressure: BackPressure
    private let batchSize: Int
    private let parks: Bool

    init(policy: Policy, capacity: Int, backPressure: BackPressure, batchSize: Int = 256, runner: any WorkRunner) {
        self.state = Mutex(
            State(policy: policy, waiting: Array(repeating: nil, count: policy.workerCount), runner: runner))
        self.capacity = max(1, capacity)
        self.backPressure = backPressure
        self.batchSize = batchSize
        self.parks = policy.parksFailures
    }

    /// Admits one item under the lock; returns the worker to wake, if any.
    private func admit(
        _ item: WorkItem, _ state: inout State, now: UInt64, overCapacity: Bool = false
    ) -> (OfferResult, CheckedContinuation<Void, Never>?) {
        if state.closed { return (.closed, nil) }
        if state.policy.queuedCount >= capacity && !overCapacity { return (.full, nil) }
        startWorkersIfNeeded(&state)
        state.sequence += 1
        var item = item
        item.sequence = state.sequence
        item.acceptedAt = now
        switch state.policy.enqueue(item, now: now) {
        case .late:
            return (.late, nil)
        case .parked:
            return (.accepted, nil)
        case .wake(let worker):
            state.outstanding += 1
            defer { state.waiting[worker] = nil }
            return (.accepted, state.waiting[worker])
        case .wakeAny:
            state.outstanding += 1
            for index in state.waiting.indices where state.waiting[index] != nil {
                defer { state.waiting[index] = nil }
                return (.accepted, state.waiting[index])
            }
            return (.accepted, nil)
        }
    }

    func offer(_ item: WorkItem) -> OfferResult {
        offer(item, overCapacity: false)
    }

    private func offer(_ item: WorkItem, overCapacity: Bool) -> OfferResult {
        let now = monotonicNanoseconds()
        let (result, wake) = state.withLock { admit(item, &$0, now: now, overCapacity: overCapacity) }
        wake?.resume()
        return result
    }

    func offer(contentsOf items: [WorkItem]) -> Int {
        let now = monotonicNanoseconds()
        var wakes: [CheckedContinuation<Void, Never>] = []
        let taken = state.withLock { state -> Int in
            for (index, item) in items.enumerated() {
                let (result, wake) = admit(item, &state, now: now)
                if let wake { wakes.append(wake) }
                if result != .accepted { return index }
            }
            return items.count
        }
        for wake in wakes { wake.resume() }
        return taken
    }

    func enqueue(_ item: WorkItem) async throws(EventBusError) {
        while true {
            switch offer(item) {
            case .accepted:
                return
            case .late:
                await state.withLock { $0.runner }?.refuseLate(item)
                return
            case .closed:
                throw .refusedAfterShutdown
            case .full:
                if isCurrentWorker {
                    // A handler of this pool posting to it: waiting for room would wait on itself. Admit it over
                    // capacity (bounded by what handlers post per event).
                    if offer(item, overCapacity: true) == .accepted { return }
                    continue
                }
                if backPressure == .reject {
                    throw EventBusError(.queueFull, "the queue is full (capacity \(capacity)); retry later")
                }
                await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                    let resumeNow = state.withLock { state -> Bool in
                        if state.closed || state.policy.queuedCount < capacity { return true }
                        state.spaceWaiters.append(continuation)
                        return false
                    }
                    if resumeNow { continuation.resume() }
                }
            }
        }
    }

    private func startWorkersIfNeeded(_ state: inout State) {
        guard state.workers.isEmpty else { return }
        for index in 0..<state.policy.workerCount {
            state.workers.append(
                Task { [self] in
                    await WorkerIdentity.$pool.withValue(ObjectIdentifier(self)) { await self.workerLoop(index) }
                })
        }
    }

    private enum Next {
        case run(any WorkRunner)
        case wait
        case sleep(UInt64)
        case exit
    }

    private func workerLoop(_ worker: Int) async {
        var batch = Deque<WorkItem>()
        var routes = RouteCache()
        batch.reserveCapacity(batchSize)
        while true {
            var freed: [CheckedContinuation<Void, Never>] = []
            let next = state.withLock { state -> Next in
                let deadline = state.policy.take(
                    worker: worker, max: batchSize, now: monotonicNanoseconds(), into: &batch)
                if !batch.isEmpty {
                    // Space opened up: let suspended producers retry.
                    var room = capacity - state.policy.queuedCount
                    while room > 0, let waiter = state.spaceWaiters.popFirst() {
                        freed.append(waiter)
                        room -= 1
                    }
                    guard let runner = state.runner else { return .exit }
                    return .run(runner)
                }
                if let deadline { return .sleep(deadline) }
                if state.closed && state.outstanding == 0 { return .exit }
                return .wait
            }
            for waiter in freed { waiter.resume() }
            let runner: any WorkRunner
            switch next {
            case .exit:
                return
            case .sleep(let deadline):
                let now = monotonicNanoseconds()
                let pause = deadline > now ? min(deadline - now, 1_000_000) : 0
                try? await Task.sleep(for: .nanoseconds(Int64(max(pause, 50_000))))
                continue
            case .wait:
                await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                    let resumeNow = state.withLock { state -> Bool in
                        // An enqueue may have raced in between the take and this registration.
                        if state.closed || state.policy.hasWork(worker: worker) { return true }
                        state.waiting[worker] = continuation
                        return false
                    }
                    if resumeNow { continuation.resume() }
                }
                continue
            case .run(let batchRunner):
                runner = batchRunner
            }
            var finished = 0
            var drainWaiters: [CheckedContinuation<Void, Never>] = []
            var index = 0
            while index < batch.count {
                let item = batch[index]
                index += 1
                // With parking, a keyed item's failure parks its key instead of dead-lettering the item.
                let parksOnFailure = parks && item.event.partitionkey != nil
                if parksOnFailure && state.withLock({ $0.policy.parkIfKeyParked(item) }) {
                    // An earlier item with this key failed in this batch: this one is held too, in order.
                    finished += 1
                    continue
                }
                let deadLetter = !parksOnFailure
                let failed: Bool
                switch runner.runSync(item, deadLetterOnFailure: deadLetter, routes: &routes) {
                case .succeeded:
                    failed = false
                case .needsAsync:
                    failed = await runner.run(item, deadLetterOnFailure: deadLetter, routes: &routes)
                case .failed(let failures, let ran):
                    await runner.recordFailures(failures, ran: ran, of: item, deadLetterOnFailure: deadLetter)
                    failed = true
                }
                if failed && parksOnFailure {
                    state.withLock { $0.policy.park(item) }
                }
                finished += 1
            }
            batch.removeAll(keepingCapacity: true)
            state.withLock { state in
                state.policy.completed(worker: worker, count: finished)
                state.outstanding -= finished
                if state.outstanding == 0 {
                    drainWaiters = state.drainWaiters
                    state.drainWaiters.removeAll()
                }
            }
            for waiter in drainWaiters { waiter.resume() }
        }
    }

    @discardableResult
    func drain() async -> Bool {
        state.withLock { $0.policy.flush() }
        var waited = true
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            var wake: [CheckedContinuation<Void, Never>] = []
            let done = state.withLock { state -> Bool in
                if state.outstanding == 0 {
                    waited = false
                    return true
                }
                state.drainWaiters.append(continuation)
                wake = takeWaitingWorkers(&state)
                return false
            }
            for waiter in wake { waiter.resume() }
            if done { continuation.resume() }
        }
        return waited
    }

    func shutdown() async {
        let workers = state.withLock { state -> [Task<Void, Never>] in
            state.closed = true
            state.policy.flush()
            return state.workers
        }
        await drain()
        let wake = state.withLock { state in
            defer { state.spaceWaiters.removeAll() }
            return takeWaitingWorkers(&state) + state.spaceWaiters
        }
        for waiter in wake { waiter.resume() }
        for worker in workers { await worker.value }
        // Parked items would otherwise vanish: dead-letter them.
        for key in parkedKeys.keys { await discard(key: key, reason: "partition key parked at shutdown") }
        // The runner holds the bus: let go of it, so a bus that was shut down can be freed.
        state.withLock { $0.runner = nil }
    }

    /// Removes and returns the continuations of idle workers, for the caller to resume outside the lock.
    private func takeWaitingWorkers(_ state: inout State) -> [CheckedContinuation<Void, Never>] {
        var waiting: [CheckedContinuation<Void, Never>] = []
        for index in state.waiting.indices {
            if let waiter = state.waiting[index] { waiting.append(waiter) }
            state.waiting[index] = nil
        }
        return waiting
    }

    var parkedKeys: [String: Int] { state.withLock { $0.policy.parkedKeys } }

    var isCurrentWorker: Bool { WorkerIdentity.pool == ObjectIdentifier(self) }

    func resume(key: String) {
        let continuation = state.withLock { state -> CheckedContinuation<Void, Never>? in
            let count = state.policy.parkedKeys[key] ?? 0
            guard let worker = state.policy.resume(key: key) else { return nil }
            state.outstanding += count
            let continuation = state.waiting[worker]
            state.waiting[worker] = nil
            return continuation
        }
        continuation?.resume()
    }

    func discard(key: String) async {
        await discard(key: key, reason: "partition key discarded while parked")
    }

    private func discard(key: String, reason: String) async {
        let items = state.withLock { $0.policy.discard(key: key) }
        let runner = state.withLock { $0.runner }
        for item in items { await runner?.discard(item, reason: reason) }
    }
}
