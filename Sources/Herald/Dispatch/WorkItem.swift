/// One unit of scheduled work: an event and the handlers it is due to run.
struct WorkItem: Sendable {
    var event: CloudEvent
    var handlers: [Registration]
    var priority: Int
    var completion: (any WorkCompletion)?
    /// Monotonic nanoseconds when accepted (for the event-time hold bound and latency).
    var acceptedAt: UInt64
    /// Arrival sequence, to keep FIFO among equal priorities or times.
    var sequence: UInt64 = 0
    /// Whether a final failure goes to the bus's dead-letter sink. False for transport deliveries, which are
    /// nacked instead, so the transport redelivers and dead-letters them after its maximum attempts.
    var deadLetterOnFailure = true
}

/// Told once when a work item's handlers have all run (or it was dead-lettered without running).
protocol WorkCompletion: Sendable {
    func completed(_ outcome: HandlerRunOutcome)
}

/// What happened to one work item's handlers.
struct HandlerRunOutcome: Sendable {
    var failures: [HandlerFailure]
    var ran: Int
}
