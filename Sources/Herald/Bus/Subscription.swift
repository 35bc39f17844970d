import Metrics
import Synchronization

/// Which events a subscription receives.
public struct SubscriptionFilter: Sendable, Hashable, CustomStringConvertible {
    enum Kind: Hashable {
        case type(String)
        case prefix(String)
        case all
    }

    let kind: Kind

    /// Events of exactly this type name.
    public static func type(_ name: String) -> SubscriptionFilter { SubscriptionFilter(kind: .type(name)) }
    /// Events whose type name starts with this prefix, for example `com.example.order.`.
    public static func prefix(_ prefix: String) -> SubscriptionFilter { SubscriptionFilter(kind: .prefix(prefix)) }
    /// Every event, including ones addressed to other services (for audit logs and bridges).
    public static let all = SubscriptionFilter(kind: .all)

    func matches(_ type: String) -> Bool {
        switch kind {
        case .type(let name): return name == type
        case .prefix(let prefix): return type.hasPrefix(prefix)
        case .all: return true
        }
    }

    public var description: String {
        switch kind {
        case .type(let name): return name
        case .prefix(let prefix): return prefix + "*"
        case .all: return "*"
        }
    }
}

/// A handler with its composed middleware, as registered on a bus.
@usableFromInline
final class Registration: Sendable {
    @usableFromInline
    typealias AsyncBody = @Sendable (CloudEvent, EventContext) async throws -> Void
    @usableFromInline
    typealias SyncBody = @Sendable (CloudEvent, EventContext) throws -> Void

    /// The handler with its middleware composed in. A synchronous handler without middleware stays synchronous,
    /// so publishing to it costs no async call.
    @usableFromInline
    enum Body: Sendable {
        case sync(SyncBody)
        case async(AsyncBody)
    }

    let id: UInt64
    let name: String
    let filter: SubscriptionFilter
    let priority: Int
    let service: String
    let body: Body
    let isSync: Bool
    /// The subscription's own scheduler, when it has a strategy of its own.
    let scheduler: (any WorkScheduler)?
    let failures: Counter
    let cancelled = Atomic<Bool>(false)

    init(
        id: UInt64, name: String, filter: SubscriptionFilter, priority: Int, service: String, body: Body,
        scheduler: (any WorkScheduler)?
    ) {
        self.id = id
        self.name = name
        self.filter = filter
        self.priority = priority
        self.service = service
        self.body = body
        if case .sync = body { self.isSync = true } else { self.isSync = false }
        self.scheduler = scheduler
        self.failures = Counter(label: "herald_handler_failures_total", dimensions: [("handler", name)])
    }

    var isCancelled: Bool { cancelled.load(ordering: .relaxed) }

    /// Whether this handler receives the event: an addressed event (`recipient`) reaches only handlers of that
    /// service, and catch-all subscriptions.
    @inline(__always)
    func accepts(_ event: CloudEvent) -> Bool {
        guard let recipient = event.recipient else { return true }
        return service == recipient || filter.kind == .all
    }

    /// Orders registrations: higher priority first, then subscription order.
    static func runsBefore(_ lhs: Registration, _ rhs: Registration) -> Bool {
        lhs.priority != rhs.priority ? lhs.priority > rhs.priority : lhs.id < rhs.id
    }
}

/// The handle of a registered handler. `cancel()` unregisters it; a handler already running finishes.
public struct Subscription: Sendable, Hashable {
    let registration: Registration
    let bus: EventBus

    /// The handler's name (used in results, logs and metrics).
    public var name: String { registration.name }

    /// Unregisters the handler; events published afterwards no longer reach it. Idempotent.
    public func cancel() {
        bus.unsubscribe(registration)
    }

    /// Waits until everything queued for this subscription's own strategy has been handled.
    public func drain() async {
        _ = await registration.scheduler?.drain()
    }

    /// For a partitioned subscription with parking: the parked keys and how many events each holds.
    public var parkedKeys: [String: Int] { registration.scheduler?.parkedKeys ?? [:] }

    /// Unparks a key: the failed event runs again, then the held ones, in order.
    public func resume(partitionKey: String) { registration.scheduler?.resume(key: partitionKey) }

    /// Unparks a key and dead-letters its held events.
    public func discard(partitionKey: String) async { await registration.scheduler?.discard(key: partitionKey) }

    public static func == (lhs: Subscription, rhs: Subscription) -> Bool { lhs.registration === rhs.registration }
    public func hash(into hasher: inout Hasher) { hasher.combine(registration.id) }
}

/// A handler as a type, for handlers with dependencies of their own.
public protocol EventHandler: Sendable {
    associatedtype HandledEvent: Event
    func handle(_ event: HandledEvent, context: EventContext) async throws
}
