/// One unit of scheduled work: an event and the handlers it is due to run.
struct WorkItem: Sendable {
    var event: CloudEvent
    var handlers: [Registration]
    var priority: Int
    var completion: (any WorkCompletion)?
    /// Monotonic nanoseconds when accepted (for the event-time hold bound).
    var acceptedAt: UInt64 = 0
    /// Arrival sequence, to keep FIFO among equal priorities or times.
    var sequence: UInt64 = 0
    /// Whether a final failure goes to the bus's dead-letter sink. False for transport deliveries, which are
    /// nacked instead, so the transport redelivers and dead-letters them after its maximum attempts.
    var deadLetterOnFailure = true
    /// Whether every handler is synchronous, so a worker runs the item without an async call.
    let allSync: Bool

    init(event: CloudEvent, handlers: [Registration], priority: Int, completion: (any WorkCompletion)?) {
        self.event = event
        self.handlers = handlers
        self.priority = priority
        self.completion = completion
        var allSync = true
        for handler in handlers where !handler.isSync { allSync = false }
        self.allSync = allSync
    }
}

/// Told once when a work item's handlers have all run (or it was dead-lettered without running).
protocol WorkCompletion: AnyObject, Sendable {
    func completed(_ outcome: HandlerRunOutcome)
}

/// What happened to one work item's handlers.
struct HandlerRunOutcome: Sendable {
    var failures: [HandlerFailure]
    var ran: Int
}

/// Runs work items for a `WorkerPool`: synchronously when it can, asynchronously otherwise.
protocol WorkRunner: Sendable {
    func runSync(_ item: WorkItem, deadLetterOnFailure: Bool) -> SyncRunResult
    func recordFailures(_ failed: [(Registration, any Error)], ran: Int, of item: WorkItem, deadLetterOnFailure: Bool)
        async
    /// Runs the item; returns whether a handler failed.
    func run(_ item: WorkItem, deadLetterOnFailure: Bool) async -> Bool
    func refuseLate(_ item: WorkItem) async
    func discard(_ item: WorkItem, reason: String) async
}

enum SyncRunResult {
    case succeeded
    case needsAsync
    case failed([(Registration, any Error)], ran: Int)
}

/// Whether a queue took an offered item.
enum OfferResult: Equatable {
    case accepted
    case full
    case late
    case closed
}
