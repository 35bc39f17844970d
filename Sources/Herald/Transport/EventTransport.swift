/// The seam every way of moving events between processes implements: in memory, the Herald broker over TCP,
/// NATS JetStream. A bus linked to a transport runs the same handlers wherever the events come from.
///
/// Semantics every transport states through `capabilities` and the shared conformance suite checks:
/// - `publish` returns only when every event in the batch is as durable as the transport promises; the
///   acknowledgements are in the batch's order.
/// - `subscribe` joins a consumer group: each event reaches every group at least once, and one member per group.
///   A delivery that is not acked within `ackWait` is redelivered with `attempt + 1`; `nack(delay:)` asks for
///   redelivery after the delay; `terminate` stops redelivery (dead-lettered, where supported); after
///   `maxDeliveries` attempts an event is dead-lettered to `<topic>.dlq` with the reason.
/// - Acks name the delivery attempt, so an ack for an earlier attempt is rejected as stale.
public protocol EventTransport: Sendable {
    /// What this transport guarantees beyond at-least-once.
    var capabilities: TransportCapabilities { get }
    /// Publishes a batch; returns one acknowledgement per event, in order.
    func publish(_ events: [CloudEvent], to topic: String) async throws -> [PublishAck]
    /// Joins consumer group `group` on `topic`; the stream ends when the transport shuts down.
    func subscribe(topic: String, group: String, options: SubscribeOptions) async throws -> DeliveryStream
    /// Settles many deliveries of this transport at once; returns, per delivery, whether it was stale. Transports
    /// that can send them together do (the default settles them one by one).
    func settle(_ deliveries: [Delivery], _ settlement: Settlement) async throws -> [Bool]
    /// Stops the transport; open delivery streams finish.
    func shutdown() async
}

extension EventTransport {
    public func settle(_ deliveries: [Delivery], _ settlement: Settlement) async throws -> [Bool] {
        var stale: [Bool] = []
        stale.reserveCapacity(deliveries.count)
        for delivery in deliveries {
            do {
                try await delivery.settler.settle(delivery, settlement)
                stale.append(false)
            } catch let error as TransportError where error.code == .staleAck {
                stale.append(true)
            }
        }
        return stale
    }
}

/// Guarantees a transport offers beyond at-least-once delivery.
public struct TransportCapabilities: OptionSet, Sendable, Hashable {
    public let rawValue: Int
    public init(rawValue: Int) { self.rawValue = rawValue }
    /// Per-`partitionkey` order within a consumer group when `SubscribeOptions.ordered` is set.
    public static let orderingPerKey = TransportCapabilities(rawValue: 1 << 0)
    /// A republished (`source`, `id`) within the window returns the original position, flagged duplicate.
    public static let deduplication = TransportCapabilities(rawValue: 1 << 1)
    /// `nack(delay:)` redelivers after the delay.
    public static let delayedRedelivery = TransportCapabilities(rawValue: 1 << 2)
    /// Events past `maxDeliveries`, or terminated, go to `<topic>.dlq` with the reason.
    public static let deadLetters = TransportCapabilities(rawValue: 1 << 3)
    /// Acknowledged events survive a restart of the transport's server.
    public static let durable = TransportCapabilities(rawValue: 1 << 4)
    /// Several subscribers of one group share its deliveries (competing consumers). A push group, which has one
    /// endpoint, does not: scale it behind a load balancer.
    public static let competingConsumers = TransportCapabilities(rawValue: 1 << 5)
}

/// Where a published event landed.
public struct PublishAck: Sendable, Hashable {
    public let id: EventID
    public let partition: Int
    public let offset: Int64
    /// True when the event was a duplicate (`source`, `id`) and this is the original's position.
    public let duplicate: Bool

    public init(id: EventID, partition: Int, offset: Int64, duplicate: Bool) {
        self.id = id
        self.partition = partition
        self.offset = offset
        self.duplicate = duplicate
    }
}

/// Where a new consumer group starts reading.
public enum StartPosition: Sendable, Hashable {
    case earliest
    case latest
}

/// How a consumer group member consumes.
public struct SubscribeOptions: Sendable, Hashable {
    /// Where a new group starts (an existing group resumes where it was).
    public var start: StartPosition
    /// How long a delivery may stay unacknowledged before it is redelivered.
    public var ackWait: Duration
    /// Attempts before an event is dead-lettered.
    public var maxDeliveries: Int
    /// Delay before redelivery after an ack timeout, by attempt (the last entry repeats).
    public var backoff: [Duration]
    /// One event in flight per partition key, so each key's events are handled in order.
    public var ordered: Bool
    /// The most deliveries this member holds unacknowledged (flow control).
    public var maxInFlight: Int

    public init(
        start: StartPosition = .earliest,
        ackWait: Duration = .seconds(30),
        maxDeliveries: Int = 5,
        backoff: [Duration] = [.milliseconds(100), .milliseconds(500), .seconds(2)],
        ordered: Bool = false,
        maxInFlight: Int = 1024
    ) {
        self.start = start
        self.ackWait = ackWait
        self.maxDeliveries = maxDeliveries
        self.backoff = backoff
        self.ordered = ordered
        self.maxInFlight = maxInFlight
    }
}

/// One delivery of an event to a consumer group member. Settle it exactly once: ack, nack or terminate.
public struct Delivery: Sendable {
    public let event: CloudEvent
    /// 1 for the first delivery, then 2, 3, …
    public let attempt: Int
    public let partition: Int
    public let offset: Int64
    /// The transport object that settles this delivery (transports use it to batch settlements).
    public let settler: any DeliverySettler

    public init(event: CloudEvent, attempt: Int, partition: Int, offset: Int64, settler: any DeliverySettler) {
        self.event = event
        self.attempt = attempt
        self.partition = partition
        self.offset = offset
        self.settler = settler
    }

    /// Handled: do not deliver again. Throws `TransportError.staleAck` if this attempt was superseded.
    public func ack() async throws { try await settler.settle(self, .ack) }
    /// Not handled: deliver again after `delay`.
    public func nack(delay: Duration = .zero) async throws { try await settler.settle(self, .nack(delay)) }
    /// Never deliver again; dead-letter it with the reason (where the transport supports dead letters).
    public func terminate(reason: String) async throws { try await settler.settle(self, .terminate(reason)) }
}

/// How a delivery was settled.
public enum Settlement: Sendable, Hashable {
    case ack
    case nack(Duration)
    case terminate(String)
}

/// The transport side of settling deliveries.
public protocol DeliverySettler: Sendable {
    func settle(_ delivery: Delivery, _ settlement: Settlement) async throws
}

/// Errors transports raise.
public struct TransportError: Error, Hashable, Sendable, CustomStringConvertible {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        let name: String
        public var description: String { name }
        /// The ack names an attempt that was already redelivered, settled, or is unknown.
        public static let staleAck = Code(name: "staleAck")
        /// The transport is shut down.
        public static let shutDown = Code(name: "shutDown")
        /// An event or request is invalid (for example an event over the size limit).
        public static let invalidRequest = Code(name: "invalidRequest")
        /// The transport refused for now (overload); retry later.
        public static let unavailable = Code(name: "unavailable")
    }

    public let code: Code
    public let message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "TransportError.\(code): \(message)" }
}

/// A bus's link to a transport: the topic it publishes to and consumes from.
public struct TransportLink: Sendable {
    public var transport: any EventTransport
    public var topic: String
    /// The consumer group; the bus's `source` when nil.
    public var group: String?
    public var options: SubscribeOptions
    /// Delay before redelivery after a local handler failed, by attempt (the last entry repeats).
    public var redeliveryBackoff: [Duration]

    public init(
        _ transport: any EventTransport,
        topic: String,
        group: String? = nil,
        options: SubscribeOptions = SubscribeOptions(),
        redeliveryBackoff: [Duration] = [.milliseconds(50), .milliseconds(200), .seconds(1)]
    ) {
        self.transport = transport
        self.topic = topic
        self.group = group
        self.options = options
        self.redeliveryBackoff = redeliveryBackoff
    }
}

extension Array where Element == Duration {
    /// The delay for an attempt (1-based); the last entry repeats, empty means none.
    func delay(forAttempt attempt: Int) -> Duration {
        guard !isEmpty else { return .zero }
        return self[Swift.min(Swift.max(attempt - 1, 0), count - 1)]
    }
}
