import Foundation
import Herald
import HeraldBroker
import HeraldHTTP
import NIOCore
import NIOPosix
import Testing

@Suite("HTTP API", .timeLimit(.minutes(2))) struct HTTPAPITests {
    @Test func topicsAreCreatedDescribedListedAndDeleted() async throws {
        let server = try await HTTPTestBroker()
        defer { Task { await server.stop() } }
        let created = try await server.request("PUT", "/v1/topics/orders", json: #"{"partitions":3}"#)
        #expect(created.status == 201, "\(created.text)")
        #expect(try created.json()["partitions"] as? Int == 3)
        let again = try await server.request("PUT", "/v1/topics/orders", json: #"{"retention":{"maxAgeSeconds":60}}"#)
        #expect(again.status == 200, "an existing topic is reconfigured")
        #expect(try again.json()["retentionSeconds"] as? Int == 60)
        let conflict = try await server.request("PUT", "/v1/topics/orders", json: #"{"partitions":5}"#)
        #expect(conflict.status == 409)
        #expect(conflict.header("content-type") == "application/problem+json")
        let list = try await server.request("GET", "/v1/topics")
        #expect(list.text.contains("\"orders\""))
        #expect(try await server.request("GET", "/v1/topics/orders").status == 200)
        #expect(try await server.request("DELETE", "/v1/topics/orders").status == 204)
        let missing = try await server.request("GET", "/v1/topics/orders")
        #expect(missing.status == 404)
        #expect(try missing.json()["type"] as? String == "urn:herald:problem:not-found")
    }

    @Test func publishInBinaryStructuredAndBatchModes() async throws {
        let server = try await HTTPTestBroker()
        defer { Task { await server.stop() } }
        let binary = try await server.request(
            "POST", "/v1/topics/orders/events",
            headers: [
                ("ce-specversion", "1.0"), ("ce-id", "b-1"), ("ce-source", "/curl"), ("ce-type", "com.example.created"),
                ("ce-subject", "caf%C3%A9 %22x%22"), ("ce-partitionkey", "o-1"), ("ce-time", "2026-11-26T21:00:00Z"),
                ("content-type", "application/json"),
            ], body: Array(#"{"n":1}"#.utf8))
        #expect(binary.status == 200, "\(binary.text)")
        let result = try #require((try binary.json()["results"] as? [[String: Any]])?.first)
        #expect(result["id"] as? String == "b-1")
        #expect(result["duplicate"] as? Bool == false)
        let structured = try await server.request(
            "POST", "/v1/topics/orders/events",
            headers: [("content-type", "application/cloudevents+json; charset=utf-8")],
            body: Array(
                #"{"specversion":"1.0","id":"s-1","source":"/curl","type":"com.example.created","data":{"n":2}}"#.utf8))
        #expect(structured.status == 200, "\(structured.text)")
        let batch = try await server.request(
            "POST", "/v1/topics/orders/events", headers: [("content-type", "application/cloudevents-batch+json")],
            body: Array(
                #"[{"specversion":"1.0","id":"s-2","source":"/curl","type":"t"},{"specversion":"1.0","id":"s-1","source":"/curl","type":"com.example.created"}]"#
                    .utf8))
        #expect(batch.status == 200, "\(batch.text)")
        let results = try #require(try batch.json()["results"] as? [[String: Any]])
        #expect(results.map { $0["duplicate"] as? Bool } == [false, true], "a republished (source, id) is a duplicate")

        // The binary event's attributes survive, percent-decoding included.
        let pulled = try await server.request(
            "POST", "/v1/topics/orders/groups/g/pull", json: #"{"max":10,"waitMs":2000}"#)
        let messages = try #require(try pulled.json()["messages"] as? [[String: Any]])
        #expect(messages.count == 3)
        let first = try #require(messages.first { ($0["event"] as? [String: Any])?["id"] as? String == "b-1" })
        let event = try #require(first["event"] as? [String: Any])
        #expect(event["subject"] as? String == "café \"x\"")
        #expect(event["partitionkey"] as? String == "o-1")
        #expect((event["data"] as? [String: Any])?["n"] as? Int == 1)
    }

    @Test func invalidEventsAreRefusedWithAProblemNamingIt() async throws {
        let server = try await HTTPTestBroker()
        defer { Task { await server.stop() } }
        let missingType = try await server.request(
            "POST", "/v1/topics/t/events",
            headers: [("ce-specversion", "1.0"), ("ce-id", "1"), ("ce-source", "/x")], body: Array("{}".utf8))
        #expect(missingType.status == 400)
        #expect(missingType.header("content-type") == "application/problem+json")
        let problem = try missingType.json()
        #expect(problem["type"] as? String == "urn:herald:problem:invalid-cloudevent")
        #expect(problem["attribute"] as? String == "type")
        #expect(problem["status"] as? Int == 400)
        let badEscape = try await server.request(
            "POST", "/v1/topics/t/events",
            headers: [("ce-specversion", "1.0"), ("ce-id", "1"), ("ce-source", "/x"), ("ce-type", "a%zz")])
        #expect(badEscape.status == 400)
        #expect(try badEscape.json()["attribute"] as? String == "type")
        let badJSON = try await server.request(
            "POST", "/v1/topics/t/events", headers: [("content-type", "application/cloudevents+json")],
            body: Array("{".utf8))
        #expect(badJSON.status == 400)
        let badVersion = try await server.request(
            "POST", "/v1/topics/t/events",
            headers: [("ce-specversion", "0.3"), ("ce-id", "1"), ("ce-source", "/x"), ("ce-type", "t")])
        #expect(badVersion.status == 400)
        let badTopic = try await server.request(
            "POST", "/v1/topics/bad%20name/events",
            headers: [("ce-specversion", "1.0"), ("ce-id", "1"), ("ce-source", "/x"), ("ce-type", "t")])
        #expect(badTopic.status == 400)
        let described = try await server.request("GET", "/v1/topics")
        #expect(!described.text.contains("\"t\""), "nothing refused was stored: \(described.text)")
    }

    @Test func pullAckAndNackFollowTheGroupSemantics() async throws {
        let server = try await HTTPTestBroker()
        defer { Task { await server.stop() } }
        let group = try await server.request(
            "PUT", "/v1/topics/jobs/groups/workers",
            json: #"{"start":"earliest","ackWaitMs":30000,"maxDeliver":2,"backoffMs":[0]}"#)
        #expect(group.status == 201, "\(group.text)")
        for index in 0..<3 {
            let published = try await server.request(
                "POST", "/v1/topics/jobs/events", headers: [("content-type", "application/cloudevents+json")],
                body: Array(#"{"specversion":"1.0","id":"j\#(index)","source":"/t","type":"job"}"#.utf8))
            #expect(published.status == 200)
        }
        let pulled = try await server.request(
            "POST", "/v1/topics/jobs/groups/workers/pull", json: #"{"max":2,"waitMs":2000}"#)
        let messages = try #require(try pulled.json()["messages"] as? [[String: Any]])
        #expect(messages.count == 2, "a pull returns at most max")
        let ackIDs = messages.compactMap { $0["ackId"] as? String }
        #expect(messages.allSatisfy { $0["deliveryAttempt"] as? Int == 1 })
        let acked = try await server.request(
            "POST", "/v1/topics/jobs/groups/workers/ack", json: #"{"ackIds":["\#(ackIDs[0])"]}"#)
        #expect((try acked.json()["settled"] as? [String]) == [ackIDs[0]])
        let again = try await server.request(
            "POST", "/v1/topics/jobs/groups/workers/ack", json: #"{"ackIds":["\#(ackIDs[0])"]}"#)
        #expect((try again.json()["stale"] as? [String]) == [ackIDs[0]], "a second ack is stale")
        let nacked = try await server.request(
            "POST", "/v1/topics/jobs/groups/workers/nack", json: #"{"ackIds":["\#(ackIDs[1])"],"delayMs":0}"#)
        #expect((try nacked.json()["settled"] as? [String]) == [ackIDs[1]])
        // The third event and the nacked one (attempt 2) come next.
        var attempts: [String: Int] = [:]
        let deadline = ContinuousClock.now + .seconds(10)
        while attempts.count < 2 && ContinuousClock.now < deadline {
            let next = try await server.request(
                "POST", "/v1/topics/jobs/groups/workers/pull", json: #"{"max":10,"waitMs":1000}"#)
            for message in try next.json()["messages"] as? [[String: Any]] ?? [] {
                let id = (message["event"] as? [String: Any])?["id"] as? String ?? "?"
                attempts[id] = message["deliveryAttempt"] as? Int
                _ = try await server.request(
                    "POST", "/v1/topics/jobs/groups/workers/nack",
                    json: #"{"ackIds":["\#(message["ackId"] as? String ?? "")"]}"#)
            }
        }
        let nackedID = try #require((messages[1]["event"] as? [String: Any])?["id"] as? String)
        #expect(attempts[nackedID] == 2)
        // Both are now nacked at their last allowed attempt or will be; the nacked one was at maxDeliver → DLQ.
        var letters: [[String: Any]] = []
        while letters.isEmpty && ContinuousClock.now < deadline + .seconds(5) {
            let dlq = try await server.request("GET", "/v1/topics/jobs/dlq")
            letters = try JSONSerialization.jsonObject(with: Data(dlq.body)) as? [[String: Any]] ?? []
            if letters.isEmpty { try await Task.sleep(for: .milliseconds(50)) }
        }
        #expect(letters.contains { $0["id"] as? String == nackedID }, "after maxDeliver attempts it is dead-lettered")
        let info = try await server.request("GET", "/v1/topics/jobs/groups/workers")
        #expect(try info.json()["deadLettered"] as? Int ?? 0 >= 1)
        let replayed = try await server.request("POST", "/v1/topics/jobs/dlq/replay")
        #expect(try replayed.json()["replayed"] as? Int ?? 0 >= 1)
    }

    @Test func emptyLongPollWaitsAndReturnsNothing() async throws {
        let server = try await HTTPTestBroker()
        defer { Task { await server.stop() } }
        let start = ContinuousClock.now
        let pulled = try await server.request(
            "POST", "/v1/topics/quiet/groups/g/pull", json: #"{"max":5,"waitMs":300}"#)
        #expect(ContinuousClock.now - start >= .milliseconds(250), "a long poll waits for waitMs")
        #expect(pulled.text == #"{"messages":[]}"#)
    }

    @Test func serverSentEventsStreamAndAutoAck() async throws {
        let server = try await HTTPTestBroker()
        defer { Task { await server.stop() } }
        for index in 0..<5 {
            _ = try await server.request(
                "POST", "/v1/topics/feed/events",
                headers: [("ce-specversion", "1.0"), ("ce-id", "e\(index)"), ("ce-source", "/s"), ("ce-type", "tick")],
                body: Array("\(index)".utf8))
        }
        let request = "GET /v1/topics/feed/groups/sse/stream?autoAck=true HTTP/1.1\r\nhost: x\r\n\r\n"
        let text = try await rawExchange(port: server.httpPort, send: Array(request.utf8)) { text in
            text.components(separatedBy: "\nevent: tick\n").count > 5
        }
        #expect(text.lowercased().contains("content-type: text/event-stream"))
        #expect(text.components(separatedBy: "\nevent: tick\n").count == 6, "\(text)")
        #expect(text.contains("id: "))
        #expect(text.contains(#""id":"e4""#))
        var acked = 0
        for _ in 0..<100 where acked < 5 {
            acked = server.broker.group(topic: "feed", group: "sse")?.acked ?? 0
            try await Task.sleep(for: .milliseconds(20))
        }
        #expect(acked == 5, "autoAck acks what was written")
    }

    @Test func limitsRefuseLargeBodiesHeadsAndSmugglingShapes() async throws {
        var limits = HTTPLimits()
        limits.maxBodyBytes = 1024
        limits.maxHeaderBytes = 2048
        let server = try await HTTPTestBroker(limits: limits)
        defer { Task { await server.stop() } }
        let big = try await server.request(
            "POST", "/v1/topics/t/events", headers: [("content-type", "application/cloudevents+json")],
            body: Array(repeating: UInt8(ascii: "x"), count: 4096))
        #expect(big.status == 413)
        let declared = try await rawExchange(
            port: server.httpPort,
            send: Array("POST /v1/topics/t/events HTTP/1.1\r\nhost: x\r\ncontent-length: 999999999\r\n\r\n".utf8),
            until: { $0.contains("}") })
        #expect(declared.hasPrefix("HTTP/1.1 413"), "refused before the body is sent: \(declared)")
        let head = try await rawExchange(
            port: server.httpPort,
            send: Array(
                "GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: \(String(repeating: "a", count: 4096))\r\n\r\n".utf8),
            until: { $0.contains("}") })
        #expect(head.hasPrefix("HTTP/1.1 431"), "\(head)")
        let smuggle = try await rawExchange(
            port: server.httpPort,
            send: Array(
                "POST /v1/topics/t/events HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
                    .utf8), until: { $0.contains("\r\n\r\n") })
        #expect(smuggle.hasPrefix("HTTP/1.1 400"), "\(smuggle)")
        let health = try await server.request("GET", "/healthz")
        #expect(health.status == 200, "the server still serves")
    }

    @Test func aRequestNotWholeWithinTheRequestTimeoutClosesItsConnection() async throws {
        var limits = HTTPLimits()
        limits.requestTimeout = .milliseconds(500)
        let server = try await HTTPTestBroker(limits: limits)
        defer { Task { await server.stop() } }
        // A slowloris head: a byte every 50 ms keeps the connection busy but never finishes the request.
        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .connect(host: "127.0.0.1", port: server.httpPort).get()
        let head =
            Array("POST /v1/topics/t/events HTTP/1.1\r\nhost: x\r\nx-slow: ".utf8)
            + Array(repeating: UInt8(ascii: "a"), count: 400)
        var sent = 0
        while channel.isActive, sent < head.count {
            try? await channel.writeAndFlush(ByteBuffer(bytes: head[sent..<(sent + 1)]))
            sent += 1
            try await Task.sleep(for: .milliseconds(50))
        }
        #expect(!channel.isActive, "closed by the server while the head was still trickling in")
        #expect(sent < head.count)
        try? await channel.close()
        // A stalled body: the head is whole, the body never comes. (The exchange ends when the peer closes, or
        // after 20 s: far beyond the 0.5 s limit.)
        let started = ContinuousClock.now
        let stalled = try await rawExchange(
            port: server.httpPort,
            send: Array("POST /v1/topics/t/events HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nabc".utf8),
            until: { _ in false }, timeout: .seconds(20))
        #expect(stalled.isEmpty, "closed without an answer: \(stalled)")
        #expect(ContinuousClock.now - started < .seconds(15), "closed by the server, not by the exchange's own limit")
        // Whole requests are served as before.
        #expect(try await server.request("GET", "/healthz").status == 200)
    }

    @Test func healthAndMetrics() async throws {
        let server = try await HTTPTestBroker()
        defer { Task { await server.stop() } }
        _ = try await server.request(
            "POST", "/v1/topics/m/events",
            headers: [("ce-specversion", "1.0"), ("ce-id", "1"), ("ce-source", "/s"), ("ce-type", "t")])
        _ = try await server.request("POST", "/v1/topics/m/groups/g/pull", json: #"{"max":1,"waitMs":1000}"#)
        let metrics = try await server.request("GET", "/metrics")
        #expect(metrics.status == 200)
        for name in [
            "herald_http_publish_seconds_bucket", "herald_end_to_end_seconds_bucket",
            "herald_group_lag{topic=\"m\",group=\"g\"}",
            "herald_group_pending", "herald_group_redelivered_total", "herald_group_dead_lettered_total",
            "herald_topic_end_offset", "herald_http_connections", "herald_http_published_events_total",
        ] {
            #expect(metrics.text.contains(name), "\(name) in /metrics")
        }
    }
}
