/// A stage around a handler: it may act before and after `next`, retry it, skip it, or fail.
///
/// Middleware composes outermost first: `[a, b]` runs `a` around `b` around the handler. The bus's middleware
/// wraps each subscription's own. The recommended order (outermost first) is:
/// `Tracing → Logging → Metrics → Deduplicate → CircuitBreaker → ConcurrencyLimit → Retry → Timeout → handler`;
/// dead-lettering is the bus's own last step after the final failure, so it sees the attempts `Retry` made.
public protocol EventMiddleware: Sendable {
    func handle(
        _ event: CloudEvent,
        context: EventContext,
        next: @Sendable (CloudEvent, EventContext) async throws -> Void
    ) async throws
}

/// Thrown by `Retry` after the last attempt failed; the bus reports `attempts` and `lastError`.
public struct RetriesExhausted: Error, Sendable, CustomStringConvertible {
    public let attempts: Int
    public let lastError: any Error
    public var description: String { "gave up after \(attempts) attempts: \(lastError)" }
}
