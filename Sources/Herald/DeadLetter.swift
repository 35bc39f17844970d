import Synchronization

/// An event that could not be handled, with why and after how many attempts.
public struct DeadLetter: Sendable {
    public let event: CloudEvent
    /// The handler that failed, or the stage that refused the event (for example "event-time").
    public let handler: String
    public let reason: String
    public let attempts: Int
    public let time: Timestamp

    public init(event: CloudEvent, handler: String, reason: String, attempts: Int, time: Timestamp = .now()) {
        self.event = event
        self.handler = handler
        self.reason = reason
        self.attempts = attempts
        self.time = time
    }
}

/// Where events go after their final failure. A transport-backed sink publishes them to `<topic>.dlq`.
public protocol DeadLetterSink: Sendable {
    func deadLetter(_ letter: DeadLetter) async
}

/// Keeps dead letters in memory, for tests and for inspection in a single process.
public final class InMemoryDeadLetters: DeadLetterSink {
    private let storage = Mutex<[DeadLetter]>([])

    public init() {}

    public func deadLetter(_ letter: DeadLetter) async {
        storage.withLock { $0.append(letter) }
    }

    /// Every dead letter so far, oldest first.
    public var letters: [DeadLetter] { storage.withLock { $0 } }

    /// Removes and returns every dead letter (for replay).
    public func removeAll() -> [DeadLetter] {
        storage.withLock { letters in
            defer { letters.removeAll() }
            return letters
        }
    }
}
