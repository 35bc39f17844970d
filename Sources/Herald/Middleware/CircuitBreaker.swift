import Synchronization

/// Stops calling a failing handler for a while. Closed: calls pass; after `failureThreshold` consecutive
/// failures it opens and fails calls at once with `CircuitOpenError` for `cooldown`; then half-open: one trial
/// call passes, and its outcome closes or reopens the circuit.
public final class CircuitBreaker: EventMiddleware {
    public enum Phase: Sendable, Hashable {
        case closed
        case open(until: UInt64)
        case halfOpen
    }

    struct State {
        var phase = Phase.closed
        var consecutiveFailures = 0
        var trialRunning = false
    }

    private let state = Mutex(State())
    public let failureThreshold: Int
    public let cooldown: Duration

    public init(failureThreshold: Int = 5, cooldown: Duration = .seconds(10)) {
        self.failureThreshold = max(1, failureThreshold)
        self.cooldown = cooldown
    }

    /// The current phase (open phases report their monotonic deadline).
    public var phase: Phase { state.withLock { $0.phase } }

    public func handle(
        _ event: CloudEvent, context: EventContext, next: @Sendable (CloudEvent, EventContext) async throws -> Void
    ) async throws {
        let now = monotonicNanoseconds()
        let admitted = state.withLock { state -> Bool in
            switch state.phase {
            case .closed:
                return true
            case .open(let until):
                guard now >= until else { return false }
                state.phase = .halfOpen
                state.trialRunning = true
                return true
            case .halfOpen:
                if state.trialRunning { return false }
                state.trialRunning = true
                return true
            }
        }
        guard admitted else { throw CircuitOpenError(handler: context.handler) }
        do {
            try await next(event, context)
            state.withLock { state in
                state.phase = .closed
                state.consecutiveFailures = 0
                state.trialRunning = false
            }
        } catch {
            let cooldown = UInt64(max(0, self.cooldown.nanoseconds))
            state.withLock { state in
                state.consecutiveFailures += 1
                state.trialRunning = false
                if case .halfOpen = state.phase {
                    state.phase = .open(until: monotonicNanoseconds() + cooldown)
                } else if state.consecutiveFailures >= failureThreshold {
                    state.phase = .open(until: monotonicNanoseconds() + cooldown)
                }
            }
            throw error
        }
    }
}

/// The circuit is open: the handler was not called.
public struct CircuitOpenError: Error, Sendable, CustomStringConvertible {
    public let handler: String
    public var description: String { "circuit open for handler '\(handler)'; not called" }
}
