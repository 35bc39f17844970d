import DequeModule
import Synchronization

/// Lets at most `limit` handler calls run at once (across every event and subscription sharing this instance);
/// others wait their turn in arrival order.
public final class ConcurrencyLimit: EventMiddleware {
    struct State {
        var running = 0
        var waiting = Deque<CheckedContinuation<Void, Never>>()
        var peak = 0
    }

    private let state = Mutex(State())
    public let limit: Int

    public init(_ limit: Int) {
        self.limit = max(1, limit)
    }

    /// The most calls that ever ran at once.
    public var peak: Int { state.withLock { $0.peak } }

    public func handle(
        _ event: CloudEvent, context: EventContext, next: @Sendable (CloudEvent, EventContext) async throws -> Void
    ) async throws {
        await acquire()
        defer { release() }
        try await next(event, context)
    }

    private func acquire() async {
        let admitted = state.withLock { state -> Bool in
            guard state.running < limit else { return false }
            state.running += 1
            state.peak = max(state.peak, state.running)
            return true
        }
        if admitted { return }
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let now = state.withLock { state -> Bool in
                if state.running < limit {
                    state.running += 1
                    state.peak = max(state.peak, state.running)
                    return true
                }
                state.waiting.append(continuation)
                return false
            }
            if now { continuation.resume() }
        }
    }

    private func release() {
        // Hand the slot straight to the next waiter, so `running` never dips and lets a newcomer jump the queue.
        let next = state.withLock { state -> CheckedContinuation<Void, Never>? in
            if let next = state.waiting.popFirst() { return next }
            state.running -= 1
            return nil
        }
        next?.resume()
    }
}
