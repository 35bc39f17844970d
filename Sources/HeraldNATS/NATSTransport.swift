import Foundation
import Herald
import Logging
import NIOSSL
import Synchronization

/// An `EventTransport` on NATS JetStream, for systems that outgrow one machine.
///
/// - A topic is a stream `HERALD_<topic>` (file storage, `replicas` copies) over the subjects
///   `herald.<topic>.<partition>`; an event's partition comes from its `partitionkey` (round robin without one).
/// - Events travel in the CloudEvents NATS binding's binary mode: attributes as `ce-` headers, `data` as the body.
///   `Nats-Msg-Id` is the event's (source, id), so a republish within the stream's duplicate window returns the
///   original sequence, flagged duplicate.
/// - A consumer group is a durable pull consumer; ordered mode uses one consumer per partition with one
///   unacknowledged message each, so a key's next event waits until the one before is acked.
/// - The server redelivers after the ack wait and after a nak's delay; the transport counts attempts (the ack
///   subject's delivery count) and dead-letters to `<topic>.dlq` after `maxDeliveries`, or on terminate, before it
///   sends `+TERM` (the dead letter's `Nats-Msg-Id` makes a retry of this harmless).
public final class NATSTransport: EventTransport {
    public struct Configuration: Sendable {
        public var servers: [NATSConnection.Server]
        public var token: String?
        public var user: String?
        public var password: String?
        /// Partitions of a new topic's stream (subjects).
        public var partitions: Int
        /// Copies of each stream in a JetStream cluster.
        public var replicas: Int
        public var duplicateWindow: Duration
        public var clientName: String
        /// TLS to the servers (NATS upgrades after INFO).
        public var tls: TLSConfiguration?

        public init(
            servers: [NATSConnection.Server], token: String? = nil, user: String? = nil, password: String? = nil,
            partitions: Int = 16, replicas: Int = 1, duplicateWindow: Duration = .seconds(120),
            clientName: String = "herald", tls: TLSConfiguration? = nil
        ) {
            self.tls = tls
            self.servers = servers
            self.token = token
            self.user = user
            self.password = password
            self.partitions = partitions
            self.replicas = replicas
            self.duplicateWindow = duplicateWindow
            self.clientName = clientName
        }

        /// `nats://host:port[,nats://host:port…]`.
        public init?(url: String) {
            let servers = url.split(separator: ",").compactMap { NATSConnection.Server(url: String($0)) }
            guard !servers.isEmpty else { return nil }
            self.init(servers: servers)
        }
    }

    public let configuration: Configuration
    public let connection: NATSConnection
    let jetStream: JetStream
    let logger: Logger
    let ready = Mutex<Task<Void, any Error>?>(nil)
    let streams = Mutex<Set<String>>([])
    let members = Mutex<[ObjectIdentifier: NATSGroupMember]>([:])

    public init(configuration: Configuration, logger: Logger = Logger(label: "herald.nats")) {
        self.configuration = configuration
        self.logger = logger
        connection = NATSConnection(
            configuration: .init(
                servers: configuration.servers, name: configuration.clientName, token: configuration.token,
                user: configuration.user, password: configuration.password, tls: configuration.tls),
            logger: logger)
        jetStream = JetStream(connection: connection)
    }

    public var capabilities: TransportCapabilities {
        [.orderingPerKey, .deduplication, .delayedRedelivery, .deadLetters, .durable, .competingConsumers]
    }

    // MARK: Names

    /// A topic or group name as one NATS token: letters, digits and `-` stay; `_` becomes `__`; anything else
    /// `_XX` (hex). Distinct names stay distinct.
    static func token(_ name: String) -> String {
        var result = ""
        for byte in name.utf8 {
            switch byte {
            case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
                UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "-"):
                result.unicodeScalars.append(Unicode.Scalar(byte))
            case UInt8(ascii: "_"): result += "__"
            default: result += "_" + String(byte, radix: 16, uppercase: true).leftPadded(to: 2)
            }
        }
        return result
    }

    static func streamName(_ topic: String) -> String { "HERALD_" + token(topic) }
    static func subject(_ topic: String, partition: Int) -> String { "herald.\(token(topic)).\(partition)" }

    /// By the partition key; without one by the event's (source, id), so a republished duplicate lands where
    /// the original did.
    static func partition(of event: CloudEvent, count: Int) -> Int {
        var unused = 0
        return PartitionHash.partition(
            forKey: event.partitionkey ?? "\(event.source)\u{0}\(event.id)", count: count, roundRobin: &unused)
    }

    // MARK: Connection and streams

    func connected() async throws {
        let task = ready.withLock { task -> Task<Void, any Error> in
            if let task { return task }
            let made = Task { try await self.connection.connect() }
            task = made
            return made
        }
        do {
            try await task.value
        } catch {
            ready.withLock { $0 = nil }
            throw TransportError(.unavailable, "NATS cannot be reached: \(error)")
        }
    }

    func ensureStream(_ topic: String) async throws {
        try await connected()
        let name = Self.streamName(topic)
        if streams.withLock({ $0.contains(name) }) { return }
        try await retrying("create stream \(name)") {
            try await self.jetStream.ensureStream(
                .init(
                    name: name, subjects: ["herald.\(Self.token(topic)).*"], replicas: self.configuration.replicas,
                    duplicateWindow: self.configuration.duplicateWindow))
        }
        _ = streams.withLock { $0.insert(name) }
    }

    /// Runs `body` again while the failure is a lost connection, a timeout or a transient JetStream answer (a
    /// cluster forming or electing a leader, a reconnect), for up to 30 s; other failures are thrown at once.
    func retrying<T: Sendable>(_ what: String, _ body: @escaping @Sendable () async throws -> T) async throws -> T {
        let deadline = ContinuousClock.now + .seconds(30)
        var delay = Duration.milliseconds(50)
        while true {
            do {
                return try await body()
            } catch let error as NATSError where error.code != .closed && ContinuousClock.now < deadline {
                logger.debug("retrying", metadata: ["what": "\(what)", "error": "\(error)"])
            } catch let error as JetStream.APIError where error.isTransient && ContinuousClock.now < deadline {
                logger.debug("retrying", metadata: ["what": "\(what)", "error": "\(error)"])
            } catch let error as NATSError {
                throw TransportError(error.code == .closed ? .shutDown : .unavailable, "\(what): \(error)")
            } catch let error as JetStream.APIError {
                throw TransportError(.unavailable, "\(what): \(error)")
            }
            try await Task.sleep(for: delay)
            delay = min(delay * 2, .seconds(1))
        }
    }

    // MARK: Publishing

    public func publish(_ events: [CloudEvent], to topic: String) async throws -> [PublishAck] {
        guard !events.isEmpty else { return [] }
        try await ensureStream(topic)
        // One write for the batch, in order (a key's events keep their order), then every PubAck.
        var messages: [(subject: String, headers: NATSHeaders, payload: [UInt8], messageID: String?)] = []
        var partitions: [Int] = []
        for event in events {
            let partition = Self.partition(of: event, count: configuration.partitions)
            let (headers, body) = try Self.binary(event)
            messages.append(
                (Self.subject(topic, partition: partition), NATSHeaders(headers), body, Self.messageID(event)))
            partitions.append(partition)
        }
        let batch = messages
        let acks = try await retrying("publish to \(topic)") { try await self.jetStream.publish(batch) }
        return zip(events, zip(partitions, acks)).map { event, placed in
            PublishAck(
                id: event.id, partition: placed.0, offset: Int64(placed.1.sequence), duplicate: placed.1.duplicate)
        }
    }

    static func binary(_ event: CloudEvent) throws -> ([(name: String, value: String)], [UInt8]) {
        do {
            return try CloudEventHTTPBinding.encodeBinary(event)
        } catch {
            throw TransportError(.invalidRequest, "the event cannot be sent: \(error.message)")
        }
    }

    static func messageID(_ event: CloudEvent) -> String {
        CloudEventHTTPBinding.percentEncode(event.source) + " "
            + CloudEventHTTPBinding.percentEncode(event.id.description)
    }

    func publish(_ event: CloudEvent, subject: String, id: String?) async throws -> JetStream.PubAck {
        let (headers, body) = try Self.binary(event)
        let messageID = id ?? Self.messageID(event)
        return try await retrying("publish to \(subject)") {
            try await self.jetStream.publish(
                subject, headers: NATSHeaders(headers), payload: body, messageID: messageID)
        }
    }

    /// Publishes the dead letter of `event` to `<topic>.dlq` (once per group and event, by its message id).
    func deadLetter(_ event: CloudEvent, topic: String, group: String, reason: String, attempts: Int) async throws {
        var letter = event
        letter.extensions["deadletterreason"] = .string(reason)
        letter.extensions["deliveryattempts"] = .integer(Int32(clamping: attempts))
        letter.extensions["deadlettergroup"] = .string(group)
        let dlq = topic + ".dlq"
        try await ensureStream(dlq)
        let partition = Self.partition(of: event, count: configuration.partitions)
        _ = try await publish(
            letter, subject: Self.subject(dlq, partition: partition),
            id: "dlq " + CloudEventHTTPBinding.percentEncode(group) + " "
                + CloudEventHTTPBinding.percentEncode(event.source) + " "
                + CloudEventHTTPBinding.percentEncode(event.id.description))
    }

    // MARK: Subscribing

    /// Acks go together: each member's acknowledgements in one write, confirmed by the server together (one round
    /// trip per member instead of one per delivery). Other settlements go one by one.
    public func settle(_ deliveries: [Delivery], _ settlement: Settlement) async throws -> [Bool] {
        var stale = [Bool](repeating: false, count: deliveries.count)
        guard case .ack = settlement else {
            for (index, delivery) in deliveries.enumerated() {
                do {
                    try await delivery.settler.settle(delivery, settlement)
                } catch let error as TransportError where error.code == .staleAck {
                    stale[index] = true
                }
            }
            return stale
        }
        var byMember: [ObjectIdentifier: (member: NATSGroupMember, replies: [String])] = [:]
        for (index, delivery) in deliveries.enumerated() {
            guard let settler = delivery.settler as? NATSSettler else {
                do {
                    try await delivery.settler.settle(delivery, .ack)
                } catch let error as TransportError where error.code == .staleAck {
                    stale[index] = true
                }
                continue
            }
            do {
                try settler.claim()
                byMember[ObjectIdentifier(settler.member), default: (settler.member, [])].replies.append(settler.reply)
            } catch {
                stale[index] = true
            }
        }
        do {
            for (member, replies) in byMember.values {
                member.forget(replies)
                try await jetStream.acknowledge(replies, .ack)
            }
        } catch let error as NATSError {
            throw TransportError(error.code == .closed ? .shutDown : .unavailable, "settling: \(error)")
        }
        return stale
    }

    /// Herald's redelivery after an ack timeout — the ack wait, then the backoff delay of that attempt — as
    /// JetStream's per-delivery `backoff` list (the time delivery N may stay unacknowledged; the last repeats).
    static func redeliveryWaits(_ options: SubscribeOptions) -> [Duration] {
        options.backoff.map { options.ackWait + $0 }
    }

    public func subscribe(topic: String, group: String, options: SubscribeOptions) async throws -> DeliveryStream {
        try await ensureStream(topic)
        let stream = Self.streamName(topic)
        var consumers: [String] = []
        if options.ordered {
            for partition in 0..<configuration.partitions {
                let name = "\(Self.token(group))_p\(partition)"
                try await retrying("create consumer \(name)") {
                    try await self.jetStream.ensureConsumer(
                        stream: stream,
                        .init(
                            durable: name, filterSubject: Self.subject(topic, partition: partition),
                            ackWait: options.ackWait, maxAckPending: 1, deliverAll: options.start == .earliest,
                            backoff: Self.redeliveryWaits(options)))
                }
                consumers.append(name)
            }
        } else {
            let name = Self.token(group)
            try await retrying("create consumer \(name)") {
                try await self.jetStream.ensureConsumer(
                    stream: stream,
                    .init(
                        durable: name, ackWait: options.ackWait, maxAckPending: max(1, options.maxInFlight),
                        deliverAll: options.start == .earliest, backoff: Self.redeliveryWaits(options)))
            }
            consumers.append(name)
        }
        let member = NATSGroupMember(
            transport: self, topic: topic, group: group, stream: stream, consumers: consumers, options: options)
        let (deliveries, buffer) = DeliveryStream.make { [weak self, weak member] in
            guard let member else { return }
            _ = self?.members.withLock { $0.removeValue(forKey: ObjectIdentifier(member)) }
            Task { await member.leave() }
        }
        members.withLock { $0[ObjectIdentifier(member)] = member }
        try await member.start(buffer)
        return deliveries
    }

    public func shutdown() async {
        let all = members.withLock { members in
            defer { members = [:] }
            return Array(members.values)
        }
        for member in all { await member.leave() }
        await connection.close()
    }
}

extension String {
    func leftPadded(to width: Int) -> String {
        count >= width ? self : String(repeating: "0", count: width - count) + self
    }
}
