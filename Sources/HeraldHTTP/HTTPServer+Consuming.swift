import DequeModule
import Foundation
import HTTPTypes
import Herald
import HeraldBroker
import HeraldWire
import Hummingbird
import NIOCore
import Synchronization

/// An ack id names one delivery attempt: `partition.offset.attempt`.
struct AckID: Hashable {
    var partition: UInt32
    var offset: Int64
    var attempt: UInt32

    init(_ delivery: WireDelivery) {
        partition = delivery.partition
        offset = delivery.offset
        attempt = delivery.attempt
    }

    init?(_ text: String) {
        let parts = text.split(separator: ".")
        guard parts.count == 3, let partition = UInt32(parts[0]), let offset = Int64(parts[1]),
            let attempt = UInt32(parts[2])
        else { return nil }
        self.partition = partition
        self.offset = offset
        self.attempt = attempt
    }

    var text: String { "\(partition).\(offset).\(attempt)" }

    func item(_ settlement: WireSettlement) -> SettleItem {
        SettleItem(settlement: settlement, partition: partition, offset: offset, attempt: attempt)
    }
}

/// Deliveries handed to an HTTP consumer, waiting to be taken by a pull or written to a stream.
final class BufferedMember: BrokerMember {
    struct State {
        var buffer = Deque<WireDelivery>()
        var waiters: [CheckedContinuation<Void, Never>] = []
        var closed = false
        var activePulls = 0
    }

    let state = Mutex(State())
    let bound: Int

    /// - Parameter bound: deliveries buffered at most before the broker pauses delivering to it.
    init(bound: Int) {
        self.bound = bound
    }

    func deliver(_ deliveries: [WireDelivery]) -> Bool {
        let waiters = state.withLock { state -> [CheckedContinuation<Void, Never>]? in
            guard !state.closed else { return nil }
            state.buffer.append(contentsOf: deliveries)
            defer { state.waiters = [] }
            return state.waiters
        }
        guard let waiters else { return false }
        for waiter in waiters { waiter.resume() }
        return true
    }

    var canAcceptDeliveries: Bool { state.withLock { $0.buffer.count < bound } }

    func take(_ max: Int) -> [WireDelivery] {
        state.withLock { state in
            let count = min(max, state.buffer.count)
            defer { state.buffer.removeFirst(count) }
            return Array(state.buffer.prefix(count))
        }
    }

    /// Returns when something is buffered, the member closes, or the deadline passes.
    func wait(until deadline: ContinuousClock.Instant) async {
        let timer = Task {
            try? await Task.sleep(until: deadline)
            self.wakeAll()
        }
        await withTaskCancellationHandler {
            await withCheckedContinuation { continuation in
                let ready = state.withLock { state -> Bool in
                    if !state.buffer.isEmpty || state.closed { return true }
                    state.waiters.append(continuation)
                    return false
                }
                if ready { continuation.resume() }
            }
        } onCancel: {
            self.wakeAll()
        }
        timer.cancel()
    }

    func wakeAll() {
        let waiters = state.withLock { state in
            defer { state.waiters = [] }
            return state.waiters
        }
        for waiter in waiters { waiter.resume() }
    }

    func close() {
        state.withLock { $0.closed = true }
        wakeAll()
    }
}

/// One pull member per (topic, group), kept while the server runs; pulls grant it credit for what they ask.
final class Pullers: Sendable {
    private let members = Mutex<[String: (member: BufferedMember, id: Int)]>([:])

    func member(broker: Broker, topic: String, group: String) throws -> (member: BufferedMember, id: Int) {
        let key = topic + "\u{0}" + group
        if let existing = members.withLock({ $0[key] }), broker.group(topic: topic, group: group) != nil {
            return existing
        }
        let member = BufferedMember(bound: Int.max)
        let id = try broker.subscribe(
            GroupSettings().subscribeRequest(topic: topic, group: group, maxInFlight: 1), member: member)
        broker.grant(member: id, credit: 0)
        let replaced = members.withLock { members in
            defer { members[key] = (member, id) }
            return members[key]
        }
        if let replaced {
            replaced.member.close()
            broker.unsubscribe(member: replaced.id)
        }
        return (member, id)
    }

    func close(broker: Broker) {
        let all = members.withLock { members in
            defer { members = [:] }
            return Array(members.values)
        }
        for (member, id) in all {
            member.close()
            broker.unsubscribe(member: id)
        }
    }
}

struct PullBody: Codable {
    var max: Int?
    var waitMs: Int?
}

struct AckBody: Codable {
    var ackIds: [String]
    var delayMs: UInt32?
}

struct SettleResult: Codable {
    /// Ack ids that were settled.
    var settled: [String]
    /// Ack ids that were not pending with that attempt any more (already settled, or redelivered since).
    var stale: [String]
}

extension HTTPServer {
    /// `POST .../pull`: up to `max` messages, waiting up to `waitMs` for the first one.
    func pull(_ request: Request, topic: String, group: String) async throws -> Response {
        let body = try await decodeJSON(PullBody.self, request, empty: PullBody())
        let max = min(Swift.max(1, body.max ?? 10), limits.maxPullMessages)
        let wait = Duration.milliseconds(Swift.max(0, body.waitMs ?? 0))
        let deadline = ContinuousClock.now + min(wait, limits.maxPullWait)
        let (member, id) = try pullers.member(broker: broker, topic: topic, group: group)
        // Credit for what this pull asks (the broker hands waiting deliveries over at once), then take;
        // wait for the first one if there was none. Credit ends with the last concurrent pull.
        let buffered = member.state.withLock { state in
            state.activePulls += 1
            return state.buffer.count
        }
        broker.grant(member: id, credit: Swift.max(0, max - buffered))
        var taken = member.take(max)
        while taken.isEmpty && ContinuousClock.now < deadline && !Task.isCancelled {
            await member.wait(until: deadline)
            taken = member.take(max)
        }
        let last = member.state.withLock { state in
            state.activePulls -= 1
            return state.activePulls == 0
        }
        if last { broker.grant(member: id, credit: 0) }
        var text: [UInt8] = Array(#"{"messages":["#.utf8)
        for (index, delivery) in taken.enumerated() {
            if index > 0 { text.append(UInt8(ascii: ",")) }
            let event = try BinaryEvent.decode(delivery.event)
            metrics.delivered(event, topic: topic)
            text += Array(#"{"ackId":""#.utf8) + Array(AckID(delivery).text.utf8)
            text += Array(#"","deliveryAttempt":\#(delivery.attempt),"event":"#.utf8)
            text += try CloudEventJSON.encode(event)
            text.append(UInt8(ascii: "}"))
        }
        text += Array("]}".utf8)
        return Response(
            status: .ok, headers: [.contentType: "application/json"],
            body: ResponseBody(byteBuffer: ByteBuffer(bytes: text)))
    }

    /// `POST .../ack` and `.../nack`: settles by ack id, whoever received the delivery.
    func settle(_ request: Request, topic: String, group: String, nack: Bool) async throws -> Response {
        let body = try await decodeJSON(AckBody.self, request, empty: AckBody(ackIds: []))
        guard !body.ackIds.isEmpty else { throw Problem.invalid("ackIds must list at least one ack id") }
        var ids: [AckID] = []
        for text in body.ackIds {
            guard let id = AckID(text) else { throw Problem.invalid("'\(text)' is not an ack id") }
            ids.append(id)
        }
        guard broker.group(topic: topic, group: group) != nil else {
            throw BrokerError(.notFound, "no group '\(group)' on topic '\(topic)'")
        }
        let settlement: WireSettlement = nack ? .nack(delayMilliseconds: body.delayMs ?? 0) : .ack
        let stale = broker.settle(topic: topic, group: group, ids.map { $0.item(settlement) })
        var result = SettleResult(settled: [], stale: [])
        for (id, isStale) in zip(ids, stale) {
            if isStale { result.stale.append(id.text) } else { result.settled.append(id.text) }
        }
        return try json(result)
    }

    /// `GET .../stream`: Server-Sent Events, one per delivery (`id:` ack id, `event:` type, `data:` structured
    /// CloudEvent). With `?autoAck=true` each is acked once written; otherwise ack through the ack route. When
    /// the client goes away, what it held unacked is redelivered.
    func stream(_ request: Request, topic: String, group: String) async throws -> Response {
        let autoAck = request.uri.queryParameters.get("autoAck") == "true"
        let window = min(
            Swift.max(1, request.uri.queryParameters.get("max").flatMap { Int($0) } ?? limits.maxStreamInFlight),
            limits.maxStreamInFlight)
        let member = BufferedMember(bound: window)
        let id = try broker.subscribe(
            GroupSettings().subscribeRequest(topic: topic, group: group, maxInFlight: UInt32(window)), member: member)
        let broker = self.broker
        let metrics = self.metrics
        let body = ResponseBody { writer in
            defer {
                member.close()
                broker.unsubscribe(member: id)
            }
            try await writer.write(ByteBuffer(string: ": herald stream of \(topic)/\(group)\n\n"))
            var lastWrite = ContinuousClock.now
            while !Task.isCancelled {
                let deliveries = member.take(256)
                if deliveries.isEmpty {
                    if ContinuousClock.now - lastWrite > .seconds(15) {
                        try await writer.write(ByteBuffer(string: ": keep-alive\n\n"))
                        lastWrite = ContinuousClock.now
                    }
                    await member.wait(until: ContinuousClock.now + .seconds(5))
                    continue
                }
                var buffer = ByteBuffer()
                for delivery in deliveries {
                    let event = try BinaryEvent.decode(delivery.event)
                    metrics.delivered(event, topic: topic)
                    buffer.writeString("id: \(AckID(delivery).text)\nevent: \(event.type)\ndata: ")
                    buffer.writeBytes(try CloudEventJSON.encode(event))
                    buffer.writeString("\n\n")
                }
                try await writer.write(buffer)
                lastWrite = ContinuousClock.now
                if autoAck {
                    _ = broker.settle(member: id, deliveries.map { AckID($0).item(.ack) })
                }
            }
            try await writer.finish(nil)
        }
        return Response(
            status: .ok,
            headers: [.contentType: "text/event-stream", .cacheControl: "no-cache"], body: body)
    }
}
