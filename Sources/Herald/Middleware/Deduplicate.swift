import Synchronization

/// Makes a handler idempotent: an event whose (`source`, `id`) was already handled successfully within `window`
/// is skipped. A duplicate that arrives while the first copy is still running waits for it, and is skipped if
/// it succeeded or runs if it failed, so at-least-once delivery turns into effectively-once handling.
/// The table holds at most `capacity` entries (oldest evicted first).
public final class Deduplicate: EventMiddleware {
    struct Key: Hashable {
        let source: String
        let id: EventID
    }

    struct State {
        var seen: [Key: UInt64] = [:]
        var order: [(Key, UInt64)] = []
        var orderStart = 0
        var running: [Key: [CheckedContinuation<Bool, Never>]] = [:]
    }

    private let state = Mutex(State())
    public let window: Duration
    public let capacity: Int

    public init(window: Duration = .seconds(120), capacity: Int = 100_000) {
        self.window = window
        self.capacity = capacity
    }

    /// How many distinct events are remembered now.
    public var count: Int { state.withLock { $0.seen.count } }

    private enum Decision {
        case skip
        case run
        case wait
    }

    public func handle(
        _ event: CloudEvent, context: EventContext, next: @Sendable (CloudEvent, EventContext) async throws -> Void
    ) async throws {
        let key = Key(source: event.source, id: event.id)
        while true {
            let now = monotonicNanoseconds()
            let decision = state.withLock { state -> Decision in
                evictExpired(&state, now: now)
                if state.seen[key] != nil { return .skip }
                if state.running[key] != nil { return .wait }
                state.running[key] = []
                return .run
            }
            switch decision {
            case .skip:
                return
            case .wait:
                let succeeded = await withCheckedContinuation { (continuation: CheckedContinuation<Bool, Never>) in
                    let immediate = state.withLock { state -> Bool? in
                        if state.seen[key] != nil { return true }
                        guard state.running[key] != nil else { return false }
                        state.running[key]!.append(continuation)
                        return nil
                    }
                    if let immediate { continuation.resume(returning: immediate) }
                }
                if succeeded { return }
                continue
            case .run:
                do {
                    try await next(event, context)
                } catch {
                    finish(key, succeeded: false)
                    throw error
                }
                finish(key, succeeded: true)
                return
            }
        }
    }

    private func finish(_ key: Key, succeeded: Bool) {
        let now = monotonicNanoseconds()
        let waiters = state.withLock { state -> [CheckedContinuation<Bool, Never>] in
            let waiters = state.running.removeValue(forKey: key) ?? []
            if succeeded {
                state.seen[key] = now
                state.order.append((key, now))
                while state.seen.count > capacity, state.orderStart < state.order.count {
                    let (oldest, _) = state.order[state.orderStart]
                    state.seen.removeValue(forKey: oldest)
                    state.orderStart += 1
                }
            }
            return waiters
        }
        for waiter in waiters { waiter.resume(returning: succeeded) }
    }

    private func evictExpired(_ state: inout State, now: UInt64) {
        let horizon = UInt64(max(0, window.nanoseconds))
        while state.orderStart < state.order.count {
            let (key, at) = state.order[state.orderStart]
            guard now &- at > horizon else { break }
            if state.seen[key] == at { state.seen.removeValue(forKey: key) }
            state.orderStart += 1
        }
        if state.orderStart > 1024 && state.orderStart * 2 > state.order.count {
            state.order.removeFirst(state.orderStart)
            state.orderStart = 0
        }
    }
}
