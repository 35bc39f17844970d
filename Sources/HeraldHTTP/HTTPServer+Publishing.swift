import Foundation
import HTTPTypes
import Herald
import HeraldAuth
import HeraldBroker
import HeraldWire
import Hummingbird
import NIOCore

extension HTTPServer {
    /// `POST /v1/topics/{topic}/events`: the Content-Type decides the mode — `application/cloudevents+json`
    /// (structured), `application/cloudevents-batch+json` (batch), anything else binary (`ce-` headers).
    /// Answers after every event is durable (as the broker's fsync policy defines it).
    func publish(_ request: Request, topic: String) async throws -> Response {
        let start = ContinuousClock.now
        let bytes = try await body(request)
        let contentType = request.headers[.contentType]?.lowercased() ?? ""
        let events: [CloudEvent]
        if contentType.hasPrefix(CloudEventJSON.batchContentType) {
            events = try CloudEventJSON.decodeBatch(bytes)
            guard !events.isEmpty else { throw Problem.invalid("the batch is empty") }
        } else if contentType.hasPrefix(CloudEventJSON.contentType) {
            events = [try CloudEventJSON.decode(bytes)]
        } else {
            events = [
                try CloudEventHTTPBinding.decodeBinary(
                    headers: request.headers.map { (name: $0.name.canonicalName, value: $0.value) }, body: bytes)
            ]
        }
        var wire: [WireEvent] = []
        wire.reserveCapacity(events.count)
        for event in events { wire.append(try BinaryEvent.encode(event)) }
        let positions = try await broker.publish(topic: topic, events: wire)
        metrics.published(events.count, topic: topic, latency: ContinuousClock.now - start)
        // Written by hand: this is the hot path, and Foundation's encoder costs more than the rest of the reply.
        var text = ByteBuffer()
        text.reserveCapacity(16 + 80 * events.count)
        text.writeString(#"{"results":["#)
        for (index, (event, position)) in zip(events, positions).enumerated() {
            if index > 0 { text.writeString(",") }
            text.writeString(#"{"duplicate":\#(position.duplicate),"id":"#)
            text.writeBytes(CloudEventJSON.quoted(event.id.description))
            text.writeString(#","offset":\#(position.offset),"partition":\#(position.partition)}"#)
        }
        text.writeString("]}")
        return Response(status: .ok, headers: [.contentType: "application/json"], body: ResponseBody(byteBuffer: text))
    }

    struct TopicBody: Codable {
        struct Retention: Codable {
            var maxAgeSeconds: Int?
            var maxBytes: Int?
        }
        var partitions: Int?
        var retention: Retention?
    }

    /// `PUT /v1/topics/{topic}`: creates the topic, or changes the retention of an existing one.
    func putTopic(_ request: Request, topic: String, _ principal: Principal) async throws -> Response {
        let settings = try await decodeJSON(TopicBody.self, request, empty: TopicBody())
        let retention = settings.retention.map {
            TopicRetention(maxAge: $0.maxAgeSeconds.map { .seconds($0) }, maxBytes: $0.maxBytes)
        }
        if broker.topic(topic) != nil {
            if let partitions = settings.partitions, partitions != broker.topic(topic)?.partitions {
                throw Problem(
                    .conflict, code: "conflict", title: "Conflict",
                    detail: "topic '\(topic)' exists with another partition count; partitions cannot change")
            }
            return try json(
                try broker.configureTopic(topic, retention: retention ?? TopicRetention(maxAge: nil, maxBytes: nil)))
        }
        return try json(
            try broker.createTopic(topic, partitions: settings.partitions, retention: retention), status: .created)
    }

    struct GroupBody: Codable {
        struct Push: Codable {
            var url: String
        }
        /// "earliest", "latest", "offset:N" or "time:MS".
        var start: String?
        var ackWaitMs: UInt32?
        var maxDeliver: UInt32?
        var backoffMs: [UInt32]?
        var ordered: Bool?
        var push: Push?
    }

    /// `PUT /v1/topics/{topic}/groups/{group}`: creates the group (201) or replaces its options (200).
    func putGroup(_ request: Request, topic: String, group: String) async throws -> Response {
        let body = try await decodeJSON(GroupBody.self, request, empty: GroupBody())
        var settings = GroupSettings()
        if let start = body.start {
            guard let parsed = WireStart(parsing: start) else {
                throw Problem.invalid("start must be earliest, latest, offset:N or time:MS, not '\(start)'")
            }
            settings.start = parsed
        }
        if let value = body.ackWaitMs { settings.ackWaitMilliseconds = value }
        if let value = body.maxDeliver { settings.maxDeliveries = value }
        if let value = body.backoffMs { settings.backoffMilliseconds = value }
        if let value = body.ordered { settings.ordered = value }
        if let url = body.push?.url {
            guard let parsed = URL(string: url), parsed.scheme == "http" || parsed.scheme == "https", parsed.host != nil
            else { throw Problem.invalid("push.url must be an http:// or https:// URL, not '\(url)'") }
            settings.pushURL = url
        }
        let (info, created) = try broker.configureGroup(topic: topic, group: group, settings)
        return try json(info, status: created ? .created : .ok)
    }
}
