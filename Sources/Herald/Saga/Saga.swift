import Foundation
import Instrumentation
import Logging
import ServiceContextModule
import ServiceLifecycle
import Synchronization

/// A saga (process manager): state kept per correlation id across the events of one conversation, with a
/// timeout and compensation. Handling must be idempotent per state (at-least-once delivery may repeat an event):
/// return `.ignore` for an event the current state has already seen.
public protocol Saga: Sendable {
    associatedtype State: Codable & Sendable
    /// A stable name; the store keys instances by (name, correlation id).
    static var name: String { get }
    /// The event types this saga reacts to (registered with the bus's registry so they decode).
    static var events: [any Event.Type] { get }
    /// Reacts to an event of this saga's conversation. `state` is nil before the first transition.
    func handle(_ event: DecodedEvent, state: State?, context: SagaContext) async throws -> SagaTransition<State>
    /// The deadline set by the last transition passed without another transition.
    func timedOut(state: State, context: SagaContext) async throws -> SagaTransition<State>
}

/// What a saga does after an event or a timeout.
public enum SagaTransition<State: Sendable>: Sendable {
    /// Nothing changes (for example a repeated event).
    case ignore
    /// Keep this state; with a timeout, `timedOut` is called if nothing else happens before it.
    case `continue`(State, timeout: Duration?)
    /// The conversation is over; the final state is kept for inspection.
    case finish(State)
}

/// Publishes from a saga: events carry the saga's correlation id and, when triggered by one, its causation.
///
/// Their ids are derived from the transition — saga, instance, the version being written, what triggered it (the
/// event's source and id, or the timeout's deadline), the publish's index — so a transition run again because its
/// save failed publishes the same ids, and transports and consumers that deduplicate by (source, id) see a repeat,
/// not a second event; two different triggers never share ids.
public struct SagaContext: Sendable {
    public let correlationID: String
    public let trigger: CloudEvent?
    public let bus: EventBus
    /// The `source` of the events the saga publishes.
    public let source: String
    /// What makes this transition's event ids (saga, instance, version written, trigger); nil for random ids.
    let transition: String?
    private let published = PublishCounter()

    public init(correlationID: String, trigger: CloudEvent?, bus: EventBus, source: String) {
        self.init(correlationID: correlationID, trigger: trigger, bus: bus, source: source, transition: nil)
    }

    init(correlationID: String, trigger: CloudEvent?, bus: EventBus, source: String, transition: String?) {
        self.correlationID = correlationID
        self.trigger = trigger
        self.bus = bus
        self.source = source
        self.transition = transition
    }

    public func publish<E: Event>(_ event: E, _ attributes: EventAttributes = EventAttributes()) async throws {
        var attributes = attributes
        attributes.correlationID = correlationID
        attributes.causationID = attributes.causationID ?? trigger?.id.description
        if attributes.id == nil, let transition {
            attributes.id = EventID.derived(from: transition + "\u{0}" + String(published.next()))
        }
        var envelope = CloudEvent(event, source: source, attributes: attributes)
        // The trace goes on, as for a handler's response (EventContext.response).
        if let current = ServiceContext.current {
            InstrumentationSystem.instrument.inject(current, into: &envelope, using: CloudEventTraceInjector())
        }
        if envelope.traceparent == nil, let parent = trigger?.traceparent {
            envelope.traceparent = parent
            envelope.tracestate = trigger?.tracestate
        }
        try await bus.publish(envelope)
    }
}

/// Counts a transition's publishes (their index goes into their ids).
final class PublishCounter: Sendable {
    private let count = Mutex(0)
    func next() -> Int {
        count.withLock { value in
            defer { value += 1 }
            return value
        }
    }
}

extension EventID {
    /// A UUID (version 8, name-based) from `name`: the same name always gives the same id.
    static func derived(from name: String) -> EventID {
        var high = PartitionHash.fnv1a(name)
        var low = PartitionHash.fnv1a(name + "\u{1}")
        // Mix, so that close names spread over all bits.
        high ^= high >> 33
        high = high &* 0xff51_afd7_ed55_8ccd
        low ^= low >> 29
        low = low &* 0xc4ce_b9fe_1a85_ec53
        high = (high & ~0xF000) | 0x8000  // version 8
        low = (low & 0x3FFF_FFFF_FFFF_FFFF) | 0x8000_0000_0000_0000  // RFC 4122 variant
        return EventID(UUIDv7.format(high, low))
    }
}

/// A saga instance as stored.
public struct SagaRecord: Sendable, Hashable {
    public var saga: String
    public var id: String
    public var state: [UInt8]
    /// Increases by one with every save; saves name the version they read (optimistic concurrency).
    public var version: Int
    public var deadline: Timestamp?
    public var finished: Bool

    public init(saga: String, id: String, state: [UInt8], version: Int, deadline: Timestamp?, finished: Bool) {
        self.saga = saga
        self.id = id
        self.state = state
        self.version = version
        self.deadline = deadline
        self.finished = finished
    }
}

/// Where saga instances live: in memory here, PostgreSQL later.
public protocol SagaStore: Sendable {
    func load(saga: String, id: String) async throws -> SagaRecord?
    /// Saves `record` (whose `version` is the new one) if the stored version is still `record.version - 1`
    /// (0 = absent); otherwise throws `SagaStoreError.conflict`.
    func save(_ record: SagaRecord) async throws
    /// Unfinished instances whose deadline is at or before `time`.
    func expired(saga: String, at time: Timestamp, limit: Int) async throws -> [SagaRecord]
}

public struct SagaStoreError: Error, Hashable, Sendable, CustomStringConvertible {
    public let saga: String
    public let id: String
    public var description: String { "saga \(saga)/\(id) was changed concurrently" }

    public init(saga: String, id: String) {
        self.saga = saga
        self.id = id
    }
}

/// Keeps saga instances in memory.
public final class InMemorySagaStore: SagaStore {
    private let records = Mutex<[String: SagaRecord]>([:])

    public init() {}

    public func load(saga: String, id: String) async throws -> SagaRecord? {
        records.withLock { $0[saga + "\u{0}" + id] }
    }

    public func save(_ record: SagaRecord) async throws {
        try records.withLock { (records: inout [String: SagaRecord]) throws(SagaStoreError) in
            let key = record.saga + "\u{0}" + record.id
            guard (records[key]?.version ?? 0) == record.version - 1 else {
                throw SagaStoreError(saga: record.saga, id: record.id)
            }
            records[key] = record
        }
    }

    public func expired(saga: String, at time: Timestamp, limit: Int) async throws -> [SagaRecord] {
        records.withLock { records in
            Array(
                records.values.filter { $0.saga == saga && !$0.finished && ($0.deadline.map { $0 <= time } ?? false) }
                    .prefix(limit))
        }
    }

    /// Every stored instance of a saga.
    public func all(saga: String) -> [SagaRecord] {
        records.withLock { $0.values.filter { $0.saga == saga } }
    }
}

/// Runs a saga: subscribes it to its events on a bus, loads and saves its state per correlation id with
/// optimistic concurrency (a conflicting save is retried on fresh state), and fires timeouts. As a `Service`,
/// `run()` checks deadlines every `timeoutInterval` until graceful shutdown.
public final class SagaManager<S: Saga>: Service {
    public let saga: S
    public let store: any SagaStore
    public let bus: EventBus
    public let timeoutInterval: Duration
    private let logger: Logger
    private let subscriptions = Mutex<[Subscription]>([])
    private let service = Mutex<String?>(nil)

    public init(
        _ saga: S, store: any SagaStore, bus: EventBus, timeoutInterval: Duration = .milliseconds(100),
        logger: Logger = Logger(label: "herald.saga")
    ) {
        self.saga = saga
        self.store = store
        self.bus = bus
        self.timeoutInterval = timeoutInterval
        self.logger = logger
    }

    /// Subscribes the saga to its event types on the bus.
    public func start(service: String? = nil) {
        self.service.withLock { $0 = service }
        for type in S.events {
            do {
                try bus.registry.register(type)
            } catch {
                logger.error("saga event type conflict", metadata: ["error": "\(error)"])
            }
        }
        let subscriptions = S.events.map { type in
            bus.subscribe(.type(type.eventType), name: "\(S.name).\(type.eventType)", service: service) {
                [self] event, _ in
                try await self.handle(event)
            }
        }
        self.subscriptions.withLock { $0 += subscriptions }
    }

    private var source: String { service.withLock { $0 } ?? bus.source }

    /// Handles one event: the conversation is the event's correlation id (its own id when it has none).
    public func handle(_ event: CloudEvent) async throws {
        let correlation = event.correlationid ?? event.id.description
        let decoded = try bus.registry.decode(event)
        try await transition(id: correlation) { state, version in
            let context = SagaContext(
                correlationID: correlation, trigger: event, bus: self.bus, source: self.source,
                transition: "\(S.name)\u{0}\(correlation)\u{0}\(version)\u{0}\(event.source)\u{0}\(event.id)")
            return try await self.saga.handle(decoded, state: state, context: context)
        }
    }

    /// Fires the timeouts that are due at `time`; returns how many fired.
    @discardableResult
    public func fireTimeouts(at time: Timestamp = .now()) async throws -> Int {
        let due = try await store.expired(saga: S.name, at: time, limit: 1000)
        for record in due {
            try await transition(id: record.id) { state, version in
                // Fire only if still due: another instance may have moved it on meanwhile.
                guard let state else { return .ignore }
                let context = SagaContext(
                    correlationID: record.id, trigger: nil, bus: self.bus, source: self.source,
                    transition:
                        "\(S.name)\u{0}\(record.id)\u{0}\(version)\u{0}timeout \(record.deadline?.nanosecondsSinceEpoch ?? 0)"
                )
                return try await self.saga.timedOut(state: state, context: context)
            } guardRecord: { current in
                current?.deadline.map { $0 <= time } ?? false
            }
        }
        return due.count
    }

    private func transition(
        id: String,
        _ step: (S.State?, Int) async throws -> SagaTransition<S.State>,
        guardRecord: (SagaRecord?) -> Bool = { _ in true }
    ) async throws {
        for _ in 0..<64 {
            let record = try await store.load(saga: S.name, id: id)
            if record?.finished == true || !guardRecord(record) { return }
            let state = try record.map { try JSONDecoder().decode(S.State.self, from: Data($0.state)) }
            // The version this transition writes names the events it publishes.
            let next = try await step(state, (record?.version ?? 0) + 1)
            let newState: S.State
            let deadline: Timestamp?
            let finished: Bool
            switch next {
            case .ignore: return
            case .continue(let value, let timeout):
                newState = value
                deadline = timeout.map { Timestamp.now().advanced(by: $0) }
                finished = false
            case .finish(let value):
                newState = value
                deadline = nil
                finished = true
            }
            let encoded = [UInt8](try JSONEncoder().encode(newState))
            do {
                try await store.save(
                    SagaRecord(
                        saga: S.name, id: id, state: encoded, version: (record?.version ?? 0) + 1, deadline: deadline,
                        finished: finished))
                return
            } catch is SagaStoreError {
                logger.debug("saga save conflict; retrying", metadata: ["saga": "\(S.name)", "id": "\(id)"])
                continue
            }
        }
        throw SagaStoreError(saga: S.name, id: id)
    }

    /// Checks deadlines every `timeoutInterval` until graceful shutdown.
    public func run() async throws {
        await cancelWhenGracefulShutdown {
            while !Task.isCancelled {
                do {
                    try await self.fireTimeouts()
                } catch {
                    self.logger.error("saga timeout check failed", metadata: ["error": "\(error)"])
                }
                try? await Task.sleep(for: self.timeoutInterval)
            }
        }
    }

    /// Unsubscribes the saga.
    public func stop() {
        subscriptions.withLock { subscriptions in
            for subscription in subscriptions { subscription.cancel() }
            subscriptions.removeAll()
        }
    }
}
