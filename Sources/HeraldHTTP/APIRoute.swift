import HTTPTypes
import HeraldAuth

/// What a route needs from the caller's credential when authentication is on.
public enum RouteRequirement: Sendable, Hashable {
    /// Open to everyone (only `/healthz`).
    case none
    /// `action` on the topic named in the path.
    case topic(Action)
    /// `action` on some topic (listing, metrics); results are limited to the topics it covers.
    case any(Action)
}

/// The HTTP API's route table: the one list the router is built from, docs/openapi.yaml is checked against,
/// and the authorization test matrix is generated from. Adding a case without a handler does not compile;
/// adding one without an OpenAPI entry fails the suite.
public enum APIRoute: String, CaseIterable, Sendable {
    case publish
    case listTopics
    case putTopic
    case getTopic
    case deleteTopic
    case putGroup
    case getGroup
    case deleteGroup
    case pull
    case ack
    case nack
    case stream
    case listDeadLetters
    case replayDeadLetters
    case health
    case metrics

    public var method: HTTPRequest.Method {
        switch self {
        case .publish, .pull, .ack, .nack, .replayDeadLetters: .post
        case .putTopic, .putGroup: .put
        case .deleteTopic, .deleteGroup: .delete
        case .listTopics, .getTopic, .getGroup, .stream, .listDeadLetters, .health, .metrics: .get
        }
    }

    /// The path in OpenAPI form (`{name}` captures), which the router understands as is.
    public var path: String {
        switch self {
        case .publish: "/v1/topics/{topic}/events"
        case .listTopics: "/v1/topics"
        case .putTopic, .getTopic, .deleteTopic: "/v1/topics/{topic}"
        case .putGroup, .getGroup, .deleteGroup: "/v1/topics/{topic}/groups/{group}"
        case .pull: "/v1/topics/{topic}/groups/{group}/pull"
        case .ack: "/v1/topics/{topic}/groups/{group}/ack"
        case .nack: "/v1/topics/{topic}/groups/{group}/nack"
        case .stream: "/v1/topics/{topic}/groups/{group}/stream"
        case .listDeadLetters: "/v1/topics/{topic}/dlq"
        case .replayDeadLetters: "/v1/topics/{topic}/dlq/replay"
        case .health: "/healthz"
        case .metrics: "/metrics"
        }
    }

    public var requirement: RouteRequirement {
        switch self {
        case .publish: .topic(.publish)
        case .putGroup, .getGroup, .pull, .ack, .nack, .stream: .topic(.subscribe)
        case .putTopic, .getTopic, .deleteTopic, .deleteGroup, .listDeadLetters, .replayDeadLetters: .topic(.admin)
        case .listTopics, .metrics: .any(.admin)
        case .health: .none
        }
    }
}
