/// A typed event: a Codable value with an explicit, stable CloudEvents type name.
///
/// The type name is part of the wire contract between services. It is declared, never derived from the
/// Swift type's name, so renaming or moving the Swift type does not break other services.
///
/// ```swift
/// struct OrderCreated: Event {
///     static let eventType = "com.example.order.created"
///     var orderID: String
///     var partitionKey: String? { orderID }
/// }
/// ```
public protocol Event: Codable, Sendable {
    /// The stable CloudEvents `type`, for example `com.example.order.created`.
    static var eventType: String { get }
    /// The `partitionkey` the event is published with unless the caller overrides it. Default: none.
    var partitionKey: String? { get }
    /// The CloudEvents `subject` the event is published with unless the caller overrides it. Default: none.
    var subject: String? { get }
}

extension Event {
    public var partitionKey: String? { nil }
    public var subject: String? { nil }
}

/// Optional attributes a publisher may set on an event it publishes.
public struct EventAttributes: Sendable {
    /// The `id`; a new UUIDv7 when nil.
    public var id: EventID?
    /// The `time`; now when nil.
    public var time: Timestamp?
    public var subject: String?
    public var partitionKey: String?
    /// Addresses the event to one service (a point-to-point command).
    public var recipient: String?
    public var correlationID: String?
    public var causationID: String?
    /// Scheduling priority for the priority strategy (higher first). Not part of the envelope.
    public var priority: Int
    /// Free-form CloudEvents extensions; names are validated (`[a-z0-9]`).
    public var extensions: [String: ExtensionValue]

    public init(
        id: EventID? = nil,
        time: Timestamp? = nil,
        subject: String? = nil,
        partitionKey: String? = nil,
        recipient: String? = nil,
        correlationID: String? = nil,
        causationID: String? = nil,
        priority: Int = 0,
        extensions: [String: ExtensionValue] = [:]
    ) {
        self.id = id
        self.time = time
        self.subject = subject
        self.partitionKey = partitionKey
        self.recipient = recipient
        self.correlationID = correlationID
        self.causationID = causationID
        self.priority = priority
        self.extensions = extensions
    }
}
