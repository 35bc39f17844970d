/// Retries a failing handler with exponential backoff and jitter, up to `maxAttempts` attempts in all.
///
/// The delay before attempt n+1 is `min(maxDelay, initialDelay × multiplier^(n-1))`, scaled by a random factor
/// in `[1 - jitter, 1]`. Errors for which `shouldRetry` is false fail at once. After the last attempt it throws
/// `RetriesExhausted`, which the bus unwraps to report the attempts.
public struct Retry: EventMiddleware {
    public var maxAttempts: Int
    public var initialDelay: Duration
    public var multiplier: Double
    public var maxDelay: Duration
    /// 0 = no jitter, 1 = full jitter.
    public var jitter: Double
    public var shouldRetry: @Sendable (any Error) -> Bool

    public init(
        maxAttempts: Int = 3,
        initialDelay: Duration = .milliseconds(10),
        multiplier: Double = 2,
        maxDelay: Duration = .seconds(5),
        jitter: Double = 0.2,
        shouldRetry: @escaping @Sendable (any Error) -> Bool = { !($0 is CircuitOpenError) }
    ) {
        self.maxAttempts = max(1, maxAttempts)
        self.initialDelay = initialDelay
        self.multiplier = multiplier
        self.maxDelay = maxDelay
        self.jitter = min(max(jitter, 0), 1)
        self.shouldRetry = shouldRetry
    }

    /// The delay after failed attempt `attempt` (1-based), before jitter.
    public func baseDelay(afterAttempt attempt: Int) -> Duration {
        let scale = pow(multiplier, Double(attempt - 1))
        let nanos = min(Double(initialDelay.nanoseconds) * scale, Double(maxDelay.nanoseconds))
        return .nanoseconds(Int64(nanos))
    }

    public func handle(
        _ event: CloudEvent, context: EventContext, next: @Sendable (CloudEvent, EventContext) async throws -> Void
    ) async throws {
        var attempt = 1
        while true {
            do {
                try await next(event, context)
                return
            } catch {
                guard attempt < maxAttempts, shouldRetry(error), !Task.isCancelled else {
                    throw RetriesExhausted(attempts: attempt, lastError: error)
                }
                let base = Double(baseDelay(afterAttempt: attempt).nanoseconds)
                let factor = 1 - Double.random(in: 0...jitter)
                try await Task.sleep(for: .nanoseconds(Int64(base * factor)))
                attempt += 1
            }
        }
    }
}

private func pow(_ base: Double, _ exponent: Double) -> Double {
    var result = 1.0
    var remaining = Int(exponent)
    while remaining > 0 {
        result *= base
        remaining -= 1
    }
    return result
}
