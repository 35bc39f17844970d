import Logging
import Metrics
import ServiceLifecycle
import Synchronization

/// The in-process event bus: handlers subscribe by type, prefix or to everything; `publish` runs them and waits;
/// `post` queues the event for the bus's dispatch strategy and returns once it is accepted.
///
/// Linked to an `EventTransport`, the same bus publishes to the transport instead, and runs its local handlers
/// for the events the transport delivers to it (as consumer group `source`), acknowledging each delivery after
/// its handlers succeed, so the same service code runs in process or across processes.
///
/// Failures never stop other handlers: they are reported in `PublishResult`, logged, counted in metrics
/// (`herald_handler_failures_total`), and sent to the dead-letter sink.
///
/// Lifecycle: the workers of a queued strategy start with the first posted event and hold the bus until
/// `shutdown()`, which finishes every accepted event and stops them. Run the bus as a `Service` (its `run()` shuts
/// down on graceful shutdown) or call `shutdown()` yourself.
public final class EventBus: Sendable, Service {
    /// How a bus is set up.
    public struct Configuration: Sendable {
        /// The producer name stamped as `source` on published events; also the service name for addressed events
        /// and the consumer group on a transport.
        public var source: String
        /// The strategy for posted events (default: FIFO with two workers).
        public var strategy: DispatchStrategy
        /// How many posted events may wait in a queue (per strategy) before back-pressure applies.
        public var queueCapacity: Int
        public var backPressure: BackPressure
        /// Middleware around every handler, outermost first; a subscription's own middleware runs inside these.
        public var middleware: [any EventMiddleware]
        /// Where failed events go; an in-memory sink when not set.
        public var deadLetters: any DeadLetterSink
        public var logger: Logger
        /// The transport and topic this bus is linked to, if any.
        public var transport: TransportLink?

        public init(
            source: String = "herald",
            strategy: DispatchStrategy = .fifo(workers: 2),
            queueCapacity: Int = 65_536,
            backPressure: BackPressure = .suspend,
            middleware: [any EventMiddleware] = [],
            deadLetters: any DeadLetterSink = InMemoryDeadLetters(),
            logger: Logger = Logger(label: "herald.bus"),
            transport: TransportLink? = nil
        ) {
            self.source = source
            self.strategy = strategy
            self.queueCapacity = queueCapacity
            self.backPressure = backPressure
            self.middleware = middleware
            self.deadLetters = deadLetters
            self.logger = logger
            self.transport = transport
        }
    }

    struct Route: Sendable {
        /// Handlers without a strategy of their own, in run order.
        var shared: [Registration] = []
        /// Handlers with their own strategy.
        var own: [Registration] = []
        /// Whether every shared handler is synchronous (the fast path: no async call per handler).
        var allSync = true

        /// The shared handlers that ran for an event, given how many did (addressed events skip some).
        func handlersThatRan(_ count: Int, for event: CloudEvent) -> [Registration] {
            count == shared.count ? shared : shared.filter { $0.accepts(event) && !$0.isCancelled }
        }
    }

    struct State: ~Copyable {
        var registrations: [Registration] = []
        var routes: [String: Route] = [:]
        /// The last route looked up: bursts of one type skip hashing the type name.
        var lastType = ""
        var lastRoute = Route()
        var nextID: UInt64 = 0
        var inbound: [Task<Void, Never>] = []
        var closed = false
    }

    public let configuration: Configuration
    /// Changes with every subscription change; workers' route caches compare against it.
    let subscriptionGeneration = Atomic<UInt64>(0)
    /// How many subscriptions have a strategy of their own (none: `post` can skip the route lookup).
    private let ownStrategies = Atomic<Int>(0)
    /// The bus-wide scheduler for posted events; nil for `.immediate`. Set once in `init` (it needs `self` for its
    /// runner) and never changed, so reading it needs no lock.
    private nonisolated(unsafe) var scheduler: (any WorkScheduler)?
    /// Whether a transport is linked (checked on every publish without copying the link).
    private let isLinked: Bool
    /// The registry that decodes incoming events; every subscribed event type is registered in it.
    public let registry = EventRegistry()
    private let state = Mutex(State())
    private let published = Counter(label: "herald_events_published_total")
    private let posted = Counter(label: "herald_events_posted_total")

    public var source: String { configuration.source }
    var logger: Logger { configuration.logger }

    public init(configuration: Configuration) {
        self.configuration = configuration
        self.isLinked = configuration.transport != nil
        scheduler = makeScheduler(configuration.strategy)
    }

    /// A bus with the given producer name and strategy, and defaults for the rest.
    public convenience init(source: String = "herald", strategy: DispatchStrategy = .fifo(workers: 2)) {
        self.init(configuration: Configuration(source: source, strategy: strategy))
    }

    // MARK: Subscribing

    /// Subscribes a closure to one event type.
    /// - Parameters:
    ///   - name: the handler's name in results, logs and metrics (default: the type name and a number).
    ///   - priority: higher runs first; equal priorities run in subscription order.
    ///   - service: the service this handler belongs to; events addressed (`recipient`) to a service reach only
    ///     its handlers. Defaults to the bus's `source`.
    ///   - strategy: a strategy of this subscription's own for posted events, instead of the bus's.
    ///   - middleware: middleware around this handler only (inside the bus's middleware).
    @discardableResult
    @inlinable
    public func subscribe<E: Event>(
        _ type: E.Type,
        name: String? = nil,
        priority: Int = 0,
        service: String? = nil,
        strategy: DispatchStrategy? = nil,
        middleware: [any EventMiddleware] = [],
        handler: @escaping @Sendable (E, EventContext) async throws -> Void
    ) -> Subscription {
        register(
            E.self, name: name, priority: priority, service: service, strategy: strategy, middleware: middleware,
            body: .async { event, context in try await handler(try EventBus.typedValue(E.self, of: event), context) })
    }

    /// Subscribes a synchronous closure to one event type; without middleware it runs with no async overhead.
    /// Parameters as for the asynchronous variant.
    @discardableResult
    @inlinable
    public func subscribe<E: Event>(
        _ type: E.Type,
        name: String? = nil,
        priority: Int = 0,
        service: String? = nil,
        strategy: DispatchStrategy? = nil,
        middleware: [any EventMiddleware] = [],
        handler: @escaping @Sendable (E, EventContext) throws -> Void
    ) -> Subscription {
        register(
            E.self, name: name, priority: priority, service: service, strategy: strategy, middleware: middleware,
            body: .sync { event, context in try handler(try EventBus.typedValue(E.self, of: event), context) })
    }

    /// Subscribes a handler type to its event type.
    @discardableResult
    public func subscribe<H: EventHandler>(
        _ handler: H,
        name: String? = nil,
        priority: Int = 0,
        service: String? = nil,
        strategy: DispatchStrategy? = nil,
        middleware: [any EventMiddleware] = []
    ) -> Subscription {
        subscribe(
            H.HandledEvent.self, name: name ?? String(describing: H.self), priority: priority, service: service,
            strategy: strategy, middleware: middleware
        ) { event, context in
            try await handler.handle(event, context: context)
        }
    }

    /// Subscribes a closure to raw envelopes: one type name, a type-name prefix, or every event.
    @discardableResult
    public func subscribe(
        _ filter: SubscriptionFilter,
        name: String? = nil,
        priority: Int = 0,
        service: String? = nil,
        strategy: DispatchStrategy? = nil,
        middleware: [any EventMiddleware] = [],
        handler: @escaping @Sendable (CloudEvent, EventContext) async throws -> Void
    ) -> Subscription {
        register(
            filter: filter, name: name ?? filter.description, priority: priority, service: service,
            strategy: strategy, middleware: middleware, body: .async(handler))
    }

    /// Registers a typed handler: its event type goes into the registry, so deliveries decode once.
    @usableFromInline
    func register<E: Event>(
        _ type: E.Type, name: String?, priority: Int, service: String?, strategy: DispatchStrategy?,
        middleware: [any EventMiddleware], body: Registration.Body
    ) -> Subscription {
        do {
            try registry.register(E.self)
        } catch {
            logger.error("event type name conflict", metadata: ["error": "\(error)"])
        }
        return register(
            filter: .type(E.eventType), name: name ?? E.eventType, priority: priority, service: service,
            strategy: strategy, middleware: middleware, body: body)
    }

    @usableFromInline
    func register(
        filter: SubscriptionFilter, name: String, priority: Int, service: String?, strategy: DispatchStrategy?,
        middleware: [any EventMiddleware], body: Registration.Body
    ) -> Subscription {
        let chain = configuration.middleware + middleware
        var composed = body
        if !chain.isEmpty {
            let handler: Registration.AsyncBody
            switch body {
            case .sync(let sync): handler = { event, context in try sync(event, context) }
            case .async(let async): handler = async
            }
            composed = .async(
                chain.reversed().reduce(handler) { next, stage in
                    { event, context in try await stage.handle(event, context: context, next: next) }
                })
        }
        let scheduler = strategy.flatMap { makeScheduler($0) }
        if scheduler != nil { ownStrategies.add(1, ordering: .relaxed) }
        let registration = state.withLock { state -> Registration in
            state.nextID += 1
            let registration = Registration(
                id: state.nextID, name: name, filter: filter, priority: priority, service: service ?? source,
                body: composed, scheduler: scheduler)
            state.registrations.append(registration)
            state.registrations.sort(by: Registration.runsBefore)
            invalidateRoutes(&state)
            return registration
        }
        return Subscription(registration: registration, bus: self)
    }

    func unsubscribe(_ registration: Registration) {
        guard !registration.cancelled.exchange(true, ordering: .relaxed) else { return }
        state.withLock { state in
            state.registrations.removeAll { $0 === registration }
            invalidateRoutes(&state)
        }
        // A strategy of its own has workers: let them finish what was queued (skipped: cancelled), then stop.
        if let scheduler = registration.scheduler {
            ownStrategies.subtract(1, ordering: .relaxed)
            Task { await scheduler.shutdown() }
        }
    }

    /// Forgets every cached route after a subscription change (the bus's cache and, through the generation, the
    /// workers' caches).
    private func invalidateRoutes(_ state: inout State) {
        state.routes.removeAll(keepingCapacity: true)
        state.lastType = ""
        subscriptionGeneration.add(1, ordering: .releasing)
    }

    /// The shared handlers of a work item, through a worker's route cache.
    @inline(__always)
    func handlers(of item: WorkItem, routes: inout RouteCache) -> (handlers: [Registration], allSync: Bool) {
        if let handlers = item.handlers {
            var allSync = true
            for handler in handlers where !handler.isSync { allSync = false }
            return (handlers, allSync)
        }
        let generation = subscriptionGeneration.load(ordering: .acquiring)
        if routes.generation != generation || routes.type != item.event.type {
            let route = handlers(for: item.event.type)
            routes = RouteCache(
                type: item.event.type, generation: generation, handlers: route.shared, allSync: route.allSync)
        }
        return (routes.handlers, routes.allSync)
    }

    /// The handlers for a type name, in run order.
    private func handlers(for type: String) -> Route {
        state.withLock { cachedRoute(for: type, &$0) }
    }

    /// The cached route for a type name (computed on first use after a subscription change).
    private func cachedRoute(for type: String, _ state: inout State) -> Route {
        if type == state.lastType { return state.lastRoute }
        if let route = state.routes[type] {
            state.lastType = type
            state.lastRoute = route
            return route
        }
        var route = Route()
        for registration in state.registrations where registration.filter.matches(type) {
            if registration.scheduler == nil {
                route.shared.append(registration)
                route.allSync = route.allSync && registration.isSync
            } else {
                route.own.append(registration)
            }
        }
        state.routes[type] = route
        return route
    }

    /// The handlers for a type name and whether the bus is closed, in one lock round-trip.
    private func route(for type: String) -> (Route, closed: Bool) {
        state.withLock { state in (cachedRoute(for: type, &state), state.closed) }
    }

    @inlinable
    static func typedValue<E: Event>(_ type: E.Type, of event: CloudEvent) throws -> E {
        if let value = event.typedValue(as: E.self) { return value }
        switch event.data {
        case .value(let value as E):
            return value
        case .bytes(let bytes):
            do {
                return try EventCoding.decode(E.self, from: bytes)
            } catch {
                throw CloudEventError(
                    .invalidData, attribute: "data", "data of '\(event.type)' does not decode as \(E.self): \(error)")
            }
        case .value(let other):
            throw CloudEventError(
                .typeMismatch, attribute: "type", "'\(event.type)' carries \(Swift.type(of: other)), not \(E.self)")
        case .none:
            throw CloudEventError(.invalidData, attribute: "data", "'\(event.type)' has no data")
        }
    }

    // MARK: Publishing

    /// Publishes a typed event and waits until every matching handler has finished (or, when linked to a
    /// transport, until the transport acknowledged it).
    @discardableResult
    public func publish<E: Event>(_ event: E, _ attributes: EventAttributes) async throws -> PublishResult {
        try await publish(CloudEvent(event, source: configuration.source, attributes: attributes))
    }

    /// Publishes a typed event with default attributes; see `publish(_:_:)`.
    @discardableResult
    @inlinable
    public func publish<E: Event>(_ event: E) async throws -> PublishResult {
        try await publish(CloudEvent(event, source: configuration.source))
    }

    /// Publishes an envelope and waits until every matching handler has finished (or, when linked to a
    /// transport, until the transport acknowledged it).
    /// - Throws: the transport's error when linked.
    @discardableResult
    @inline(__always)
    public func publish(_ event: CloudEvent) async throws -> PublishResult {
        published.increment()
        if isLinked, let link = configuration.transport {
            try refuseIfClosed()
            let acks = try await link.transport.publish([event], to: link.topic)
            return PublishResult(eventID: event.id, ran: [], failures: [], acknowledgement: acks.first)
        }
        let route = handlers(for: event.type)
        guard route.own.isEmpty && route.allSync else { return await dispatchLocally(event, route: route) }
        // The fast path, kept here rather than behind another async call: synchronous handlers only, and no
        // allocation when all of them succeed.
        var failed: [(Registration, any Error)] = []
        let ran = runSyncHandlers(route.shared, for: event, failed: &failed)
        let failures = failed.isEmpty ? [] : await recordFailures(failed, event: event, deadLetter: true)
        return PublishResult(
            eventID: event.id, ran: route.handlersThatRan(ran, for: event), failures: failures, acknowledgement: nil)
    }

    private func refuseIfClosed() throws(EventBusError) {
        if state.withLock({ $0.closed }) { throw .refusedAfterShutdown }
    }

    /// Runs the local handlers for an event and waits for all of them, including those with their own strategy.
    private func dispatchLocally(_ event: CloudEvent, route: Route) async -> PublishResult {
        var outcome = await runShared(route, for: event, deadLetterOnFailure: true)
        var ran = route.handlersThatRan(outcome.ran, for: event)
        if !route.own.isEmpty {
            let own = route.own.filter { $0.accepts(event) && !$0.isCancelled }
            let waiter = CompletionJoin(count: own.count)
            for registration in own {
                if registration.scheduler!.isCurrentWorker {
                    // Published by a handler running on that subscription's own workers: waiting for them would
                    // wait on ourselves, so run it here.
                    waiter.completed(await runHandlers([registration], for: event, deadLetterOnFailure: true))
                    continue
                }
                do {
                    try await registration.scheduler!.enqueue(
                        WorkItem(event: event, handlers: [registration], priority: 0, completion: waiter))
                } catch {
                    waiter.completed(
                        HandlerRunOutcome(
                            failures: [HandlerFailure(handler: registration.name, error: error, attempts: 0)], ran: 1))
                }
            }
            let ownOutcome = await waiter.wait()
            outcome.failures += ownOutcome.failures
            ran += own
        }
        return PublishResult(eventID: event.id, ran: ran, failures: outcome.failures, acknowledgement: nil)
    }

    /// Posts a typed event: returns once it is accepted by the strategy's queue (or, linked, by the transport).
    /// - Throws: `EventBusError.queueFull` when the queue is full and back-pressure is `.reject`;
    ///   `EventBusError.shutDown` after shutdown.
    public func post<E: Event>(_ event: E, _ attributes: EventAttributes) async throws {
        try await post(
            CloudEvent(event, source: configuration.source, attributes: attributes), priority: attributes.priority)
    }

    /// Posts a typed event with default attributes; see `post(_:_:)`.
    @inlinable
    public func post<E: Event>(_ event: E) async throws {
        try await post(CloudEvent(event, source: configuration.source), priority: 0)
    }

    /// Posts an envelope; see `post(_:_:)`.
    public func post(_ event: CloudEvent, priority: Int = 0) async throws {
        posted.increment()
        if isLinked, let link = configuration.transport {
            try refuseIfClosed()
            _ = try await link.transport.publish([event], to: link.topic)
            return
        }
        if let scheduler, ownStrategies.load(ordering: .relaxed) == 0 {
            // The fast path: no route lookup (the worker resolves the handlers), one lock round-trip, no async call.
            // After shutdown the queue is closed and the slow path below reports it.
            let item = WorkItem(event: event, handlers: nil, priority: priority, completion: nil)
            if scheduler.offer(item) == .accepted { return }
        }
        try await schedule(event, priority: priority, completion: nil, deadLetterOnFailure: true)
    }

    /// Posts a batch of envelopes, taking each queue's lock once per batch rather than once per event.
    /// Events are accepted in order; on an error, the events before the failing one were accepted.
    public func post(contentsOf events: [CloudEvent], priority: Int = 0) async throws {
        posted.increment(by: Int64(events.count))
        if isLinked, let link = configuration.transport {
            try refuseIfClosed()
            _ = try await link.transport.publish(events, to: link.topic)
            return
        }
        var rest = events[...]
        if let scheduler, ownStrategies.load(ordering: .relaxed) == 0 {
            // As in `post`: the workers resolve the handlers, so the whole batch goes in one offer.
            let items = events.map { WorkItem(event: $0, handlers: nil, priority: priority, completion: nil) }
            rest = events[scheduler.offer(contentsOf: items)...]
        }
        // What the queue did not take (full, closed) or subscriptions with their own strategy: one at a time.
        for event in rest {
            try await schedule(event, priority: priority, completion: nil, deadLetterOnFailure: true)
        }
    }

    /// Posts a batch of typed events; see `post(contentsOf:priority:)`.
    public func post<E: Event>(contentsOf events: [E], _ attributes: EventAttributes = EventAttributes()) async throws {
        try await post(
            contentsOf: events.map { CloudEvent($0, source: source, attributes: attributes) },
            priority: attributes.priority)
    }

    /// Hands an event to the strategies of its handlers; `completion` hears once when all of them ran.
    func schedule(
        _ event: CloudEvent, priority: Int, completion: (any WorkCompletion)?, deadLetterOnFailure: Bool
    ) async throws(EventBusError) {
        let (route, closed) = route(for: event.type)
        if closed { throw .refusedAfterShutdown }
        let own = route.own.isEmpty ? [] : route.own.filter { $0.accepts(event) && !$0.isCancelled }
        let parts = (route.shared.isEmpty ? 0 : 1) + own.count
        if parts == 0 {
            completion?.completed(HandlerRunOutcome(failures: [], ran: 0))
            return
        }
        let target: (any WorkCompletion)? =
            parts == 1 ? completion : completion.map { CompletionJoin(count: parts, then: $0) }
        if !route.shared.isEmpty {
            if let scheduler {
                var item = WorkItem(event: event, handlers: nil, priority: priority, completion: target)
                item.deadLetterOnFailure = deadLetterOnFailure
                try await scheduler.enqueue(item)
            } else {
                // Not `target?.completed(await ...)`: optional chaining would skip running the handlers.
                let outcome = await runShared(route, for: event, deadLetterOnFailure: deadLetterOnFailure)
                target?.completed(outcome)
            }
        }
        for registration in own {
            var item = WorkItem(event: event, handlers: [registration], priority: priority, completion: target)
            item.deadLetterOnFailure = deadLetterOnFailure
            try await registration.scheduler!.enqueue(item)
        }
    }

    // MARK: Running handlers

    /// Runs handlers in order for one event; a failure is recorded and the next handler still runs.
    func runHandlers(_ handlers: [Registration], for event: CloudEvent, deadLetterOnFailure: Bool) async
        -> HandlerRunOutcome
    {
        var outcome = HandlerRunOutcome(failures: [], ran: 0)
        for registration in handlers where !registration.isCancelled && registration.accepts(event) {
            outcome.ran += 1
            do {
                let context = EventContext(event: event, bus: self, registration: registration)
                switch registration.body {
                case .sync(let body): try body(event, context)
                case .async(let body): try await body(event, context)
                }
            } catch {
                outcome.failures.append(
                    await recordFailure(error, of: registration, event: event, deadLetter: deadLetterOnFailure))
            }
        }
        return outcome
    }

    /// The same for synchronous handlers, with no async call: failures are collected for the caller to record
    /// (recording may dead-letter, which is asynchronous).
    @inline(__always)
    func runSyncHandlers(
        _ handlers: [Registration], for event: CloudEvent, failed: inout [(Registration, any Error)]
    ) -> Int {
        var ran = 0
        for registration in handlers where !registration.isCancelled && registration.accepts(event) {
            guard case .sync(let body) = registration.body else { continue }
            ran += 1
            do {
                try body(event, EventContext(event: event, bus: self, registration: registration))
            } catch {
                failed.append((registration, error))
            }
        }
        return ran
    }

    /// Runs a route's shared handlers, synchronously when they all are.
    @inline(__always)
    func runShared(_ route: Route, for event: CloudEvent, deadLetterOnFailure: Bool) async -> HandlerRunOutcome {
        guard route.allSync else {
            return await runHandlers(route.shared, for: event, deadLetterOnFailure: deadLetterOnFailure)
        }
        var failed: [(Registration, any Error)] = []
        let ran = runSyncHandlers(route.shared, for: event, failed: &failed)
        let failures = failed.isEmpty ? [] : await recordFailures(failed, event: event, deadLetter: deadLetterOnFailure)
        return HandlerRunOutcome(failures: failures, ran: ran)
    }

    /// Records the failures that synchronous handlers collected.
    func recordFailures(_ failed: [(Registration, any Error)], event: CloudEvent, deadLetter: Bool) async
        -> [HandlerFailure]
    {
        var failures: [HandlerFailure] = []
        for (registration, error) in failed {
            failures.append(await recordFailure(error, of: registration, event: event, deadLetter: deadLetter))
        }
        return failures
    }

    func recordFailure(_ error: any Error, of registration: Registration, event: CloudEvent, deadLetter: Bool) async
        -> HandlerFailure
    {
        registration.failures.increment()
        let handler = registration.name
        var attempts = 1
        var cause = error
        if let exhausted = error as? RetriesExhausted {
            attempts = exhausted.attempts
            cause = exhausted.lastError
        }
        logger.error(
            "handler failed",
            metadata: [
                "handler": "\(handler)", "event.type": "\(event.type)", "event.id": "\(event.id)",
                "attempts": "\(attempts)", "error": "\(cause)",
            ])
        if deadLetter {
            await configuration.deadLetters.deadLetter(
                DeadLetter(event: event, handler: handler, reason: "\(cause)", attempts: attempts))
        }
        return HandlerFailure(handler: handler, error: cause, attempts: attempts)
    }

    private func makeScheduler(_ strategy: DispatchStrategy) -> (any WorkScheduler)? {
        let capacity = configuration.queueCapacity
        let backPressure = configuration.backPressure
        // The pool holds the bus through its runner until its `shutdown()`, which lets go of it.
        let run = BusWorkRunner(bus: self)
        func pool<P: SchedulingPolicy>(_ policy: P) -> any WorkScheduler {
            WorkerPool(policy: policy, capacity: capacity, backPressure: backPressure, runner: run)
        }
        switch strategy {
        case .immediate: return nil
        case .fifo(let workers): return pool(FIFOPolicy(workers: workers))
        case .sequential: return pool(FIFOPolicy(workers: 1))
        case .priority(let workers): return pool(PriorityPolicy(workers: workers))
        case .eventTime(let lateness, let maxHold, let latePolicy):
            return pool(EventTimePolicy(lateness: lateness, maxHold: maxHold, latePolicy: latePolicy))
        case .partitioned(let lanes, let park): return pool(PartitionedPolicy(lanes: lanes, parkFailingKeys: park))
        case .leastLoaded(let workers): return pool(LeastLoadedPolicy(workers: workers))
        }
    }

    /// The event-time strategy refused a late event: dead-letter it (never drop it silently).
    func refuseLate(_ item: WorkItem) async {
        logger.warning("late event dead-lettered", metadata: ["event.id": "\(item.event.id)"])
        await configuration.deadLetters.deadLetter(
            DeadLetter(event: item.event, handler: "event-time", reason: "late: older than the watermark", attempts: 0))
        item.completion?.completed(
            HandlerRunOutcome(
                failures: [HandlerFailure(handler: "event-time", error: LateEventError(), attempts: 0)], ran: 0))
    }

    /// A parked item was discarded (or the bus shut down with it parked): dead-letter it for each handler.
    func discardParked(_ item: WorkItem, reason: String) async {
        for handler in item.handlers ?? handlers(for: item.event.type).shared {
            await configuration.deadLetters.deadLetter(
                DeadLetter(event: item.event, handler: handler.name, reason: reason, attempts: 1))
        }
    }

    // MARK: Partition parking (bus strategy)

    /// For a partitioned bus with parking: the parked keys and how many events each holds.
    public var parkedKeys: [String: Int] { scheduler?.parkedKeys ?? [:] }

    /// Unparks a key: the failed event runs again, then the held ones, in order.
    public func resume(partitionKey: String) { scheduler?.resume(key: partitionKey) }

    /// Unparks a key and dead-letters its held events.
    public func discard(partitionKey: String) async {
        await scheduler?.discard(key: partitionKey)
    }

    // MARK: Lifecycle

    /// Waits until every accepted event has been handled, including events that handlers post meanwhile.
    public func drain() async {
        while true {
            var waited = false
            for scheduler in allSchedulers() { waited = await scheduler.drain() || waited }
            if !waited { return }
        }
    }

    /// Starts consuming from the linked transport (no-op without one).
    public func start() async throws {
        guard let link = configuration.transport else { return }
        let deliveries = try await link.transport.subscribe(
            topic: link.topic, group: link.group ?? source, options: link.options)
        let settlements = SettlementBatcher(transport: link.transport, logger: logger)
        let task = Task {
            do {
                for try await delivery in deliveries {
                    await self.accept(delivery, link: link, settlements: settlements)
                }
            } catch {
                self.logger.error("transport subscription ended", metadata: ["error": "\(error)"])
            }
        }
        state.withLock { $0.inbound.append(task) }
    }

    /// Hands one transport delivery to the local handlers; acks after they all succeed, nacks otherwise.
    private func accept(_ delivery: Delivery, link: TransportLink, settlements: SettlementBatcher) async {
        var event = delivery.event
        do {
            event = try registry.decode(event).envelope
        } catch {
            logger.error("undecodable event terminated", metadata: ["event.id": "\(event.id)", "error": "\(error)"])
            try? await delivery.terminate(reason: "\(error)")
            return
        }
        let completion = DeliveryCompletion(
            delivery: delivery, backoff: link.redeliveryBackoff, settlements: settlements)
        do {
            try await schedule(event, priority: 0, completion: completion, deadLetterOnFailure: false)
        } catch {
            // Not accepted (shutting down): let the transport redeliver it.
            try? await delivery.nack(delay: .zero)
        }
    }

    /// Stops accepting events, finishes everything accepted, stops the workers. Parked events are dead-lettered.
    public func shutdown() async {
        let inbound = state.withLock { state -> [Task<Void, Never>] in
            defer { state.inbound.removeAll() }
            return state.inbound
        }
        // Stop taking deliveries (unsettled ones go back to the transport), finish what was accepted — including
        // what its handlers post — and only then refuse new events.
        for task in inbound { task.cancel() }
        await drain()
        state.withLock { $0.closed = true }
        await drain()
        for scheduler in allSchedulers() { await scheduler.shutdown() }
    }

    /// The bus's scheduler and those of subscriptions with a strategy of their own.
    private func allSchedulers() -> [any WorkScheduler] {
        let own = state.withLock { $0.registrations.compactMap(\.scheduler) }
        return (scheduler.map { [$0] } ?? []) + own
    }

    /// Runs as a `Service`: starts the transport link, waits for graceful shutdown, then drains and stops.
    public func run() async throws {
        try await start()
        try? await gracefulShutdown()
        await shutdown()
    }
}

/// Runs work items for a pool on behalf of a bus.
struct BusWorkRunner: WorkRunner {
    let bus: EventBus

    func runSync(_ item: WorkItem, deadLetterOnFailure: Bool, routes: inout RouteCache) -> SyncRunResult {
        let (handlers, allSync) = bus.handlers(of: item, routes: &routes)
        guard allSync else { return .needsAsync }
        var failed: [(Registration, any Error)] = []
        let ran = bus.runSyncHandlers(handlers, for: item.event, failed: &failed)
        if failed.isEmpty {
            item.completion?.completed(HandlerRunOutcome(failures: [], ran: ran))
            return .succeeded
        }
        return .failed(failed, ran: ran)
    }

    func recordFailures(
        _ failed: [(Registration, any Error)], ran: Int, of item: WorkItem, deadLetterOnFailure: Bool
    ) async {
        let failures = await bus.recordFailures(
            failed, event: item.event, deadLetter: deadLetterOnFailure && item.deadLetterOnFailure)
        item.completion?.completed(HandlerRunOutcome(failures: failures, ran: ran))
    }

    func run(_ item: WorkItem, deadLetterOnFailure: Bool, routes: inout RouteCache) async -> Bool {
        let (handlers, _) = bus.handlers(of: item, routes: &routes)
        let outcome = await bus.runHandlers(
            handlers, for: item.event, deadLetterOnFailure: deadLetterOnFailure && item.deadLetterOnFailure)
        item.completion?.completed(outcome)
        return !outcome.failures.isEmpty
    }

    func refuseLate(_ item: WorkItem) async { await bus.refuseLate(item) }
    func discard(_ item: WorkItem, reason: String) async { await bus.discardParked(item, reason: reason) }
}

extension EventBusError {
    /// The bus (or its queue) is shut down.
    static var refusedAfterShutdown: EventBusError {
        EventBusError(.shutDown, "the bus is shutting down and accepts no new events")
    }
}

/// The event-time strategy refused an event older than one it already released.
public struct LateEventError: Error, Sendable, CustomStringConvertible {
    public var description: String { "event arrived after the watermark had passed its time" }
}

/// Joins the outcomes of a known number of work items into one: passed on to `then` and to whoever `wait()`s.
final class CompletionJoin: WorkCompletion {
    struct State {
        var remaining: Int
        var outcome = HandlerRunOutcome(failures: [], ran: 0)
        var continuation: CheckedContinuation<HandlerRunOutcome, Never>?
    }

    private let state: Mutex<State>
    private let then: (any WorkCompletion)?

    init(count: Int, then: (any WorkCompletion)? = nil) {
        state = Mutex(State(remaining: count))
        self.then = then
    }

    func completed(_ outcome: HandlerRunOutcome) {
        let finished = state.withLock { state -> (HandlerRunOutcome, CheckedContinuation<HandlerRunOutcome, Never>?)? in
            state.remaining -= 1
            state.outcome.failures += outcome.failures
            state.outcome.ran += outcome.ran
            guard state.remaining == 0 else { return nil }
            defer { state.continuation = nil }
            return (state.outcome, state.continuation)
        }
        guard let (outcome, continuation) = finished else { return }
        then?.completed(outcome)
        continuation?.resume(returning: outcome)
    }

    func wait() async -> HandlerRunOutcome {
        await withCheckedContinuation { continuation in
            let ready = state.withLock { state -> HandlerRunOutcome? in
                if state.remaining <= 0 { return state.outcome }
                state.continuation = continuation
                return nil
            }
            if let ready { continuation.resume(returning: ready) }
        }
    }
}
