/// Fails a handler attempt that takes longer than `limit` with `HandlerTimeoutError`, and cancels it.
/// Handlers should be cancellation-aware (`Task.sleep`, `Task.checkCancellation`) so a cancelled attempt ends.
public struct Timeout: EventMiddleware {
    public var limit: Duration

    public init(_ limit: Duration) {
        self.limit = limit
    }

    public func handle(
        _ event: CloudEvent, context: EventContext, next: @Sendable (CloudEvent, EventContext) async throws -> Void
    ) async throws {
        let limit = self.limit
        try await withoutActuallyEscaping(next) { next in
            let box = UncheckedSendable(next)
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await box.value(event, context) }
                group.addTask {
                    try await Task.sleep(for: limit)
                    throw HandlerTimeoutError(limit: limit)
                }
                defer { group.cancelAll() }
                try await group.next()
            }
        }
    }
}

/// A handler attempt ran past its time limit.
public struct HandlerTimeoutError: Error, Sendable, CustomStringConvertible {
    public let limit: Duration
    public var description: String { "handler did not finish within \(limit)" }
}

/// Carries a value across a concurrency boundary the compiler cannot prove safe.
struct UncheckedSendable<Value>: @unchecked Sendable {
    // Safe where used: `Timeout` awaits its task group before returning, so the non-escaping closure it wraps
    // never outlives the call.
    let value: Value
    init(_ value: Value) { self.value = value }
}
