/// One unit of scheduled work: an event and the handlers it is due to run.
struct WorkItem: Sendable {
    var event: CloudEvent
    /// The handlers to run, or nil for "the bus's shared handlers for the event's type", which the worker looks
    /// up in a cache of its own: that way no per-event reference to a shared array crosses between threads.
    var handlers: [Registration]?
    var priority: Int
    var completion: (any WorkCompletion)?
    /// Monotonic nanoseconds when accepted (for the event-time hold bound).
    var acceptedAt: UInt64 = 0
    /// Arrival sequence, to keep FIFO among equal priorities or times.
    var sequence: UInt64 = 0
    /// Whether a final failure goes to the bus's dead-letter sink. False for transport deliveries, which are
    /// nacked instead, so the transport redelivers and dead-letters them after its maximum attempts.
    var deadLetterOnFailure = true
    init(event: CloudEvent, handlers: [Registration]?, priority: Int, completion: (any WorkCompletion)?) {
        self.event = event
        self.handlers = handlers
        self.priority = priority
        self.completion = completion
    }
}

/// A worker's cache of the last route it looked up, valid while the bus's subscriptions are unchanged.
struct RouteCache {
    var type = ""
    var generation: UInt64 = .max
    var handlers: [Registration] = []
    var allSync = true
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
    func runSync(_ item: WorkItem, deadLetterOnFailure: Bool, routes: inout RouteCache) -> SyncRunResult
    func recordFailures(_ failed: [(Registration, any Error)], ran: Int, of item: WorkItem, deadLetterOnFailure: Bool)
        async
    /// Runs the item; returns whether a handler failed.
    func run(_ item: WorkItem, deadLetterOnFailure: Bool, routes: inout RouteCache) async -> Bool
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
