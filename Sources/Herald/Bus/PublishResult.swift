/// What became of one published event: each matching handler's outcome.
public struct PublishResult: Sendable {
    /// The published event's id.
    public let eventID: EventID
    let ran: [Registration]
    /// The handlers that ran, in the order they ran (or, for a transport, none: they run elsewhere).
    public var handlers: [String] { ran.map(\.name) }
    /// The handlers that failed, with their errors. Empty when all succeeded.
    public let failures: [HandlerFailure]
    /// The transport's acknowledgement when the bus is linked to one.
    public let acknowledgement: PublishAck?

    /// Every handler's outcome.
    public var outcomes: [HandlerOutcome] {
        handlers.map { name in
            if let failure = failures.first(where: { $0.handler == name }) { return .failed(name, failure.error) }
            return .succeeded(name)
        }
    }

    /// Whether every handler succeeded.
    public var succeeded: Bool { failures.isEmpty }
}

/// One handler's outcome.
public enum HandlerOutcome: Sendable {
    case succeeded(String)
    case failed(String, any Error)

    public var handler: String {
        switch self {
        case .succeeded(let name), .failed(let name, _): return name
        }
    }
}

/// A handler failure: which handler, the error, and how many attempts were made.
public struct HandlerFailure: Sendable {
    public let handler: String
    public let error: any Error
    public let attempts: Int
}
