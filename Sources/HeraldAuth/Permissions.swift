/// What a credential may do to a topic.
public enum Action: String, Sendable, Hashable, CaseIterable, Codable {
    /// Publish events to the topic.
    case publish
    /// Create its consumer groups, pull, stream, ack and nack.
    case subscribe
    /// Create, configure and delete the topic and its groups, read and replay its dead letters, read metrics.
    case admin
}

/// A topic name pattern: `*` matches any run of characters (dots included), everything else matches itself.
/// `orders` matches only `orders`; `orders.*` matches `orders.eu` and `orders.eu.dlq`; `*` matches every topic.
public struct TopicPattern: Sendable, Hashable, CustomStringConvertible, Codable {
    public let text: String
    private let parts: [Substring]

    public init(_ text: String) {
        self.text = text
        parts = text.split(separator: "*", omittingEmptySubsequences: false)
    }

    public init(from decoder: any Decoder) throws {
        self.init(try decoder.singleValueContainer().decode(String.self))
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.singleValueContainer()
        try container.encode(text)
    }

    public var description: String { text }

    /// Whether `topic` matches (a glob with `*` only; each literal part is found greedily left to right).
    public func matches(_ topic: String) -> Bool {
        guard parts.count > 1 else { return topic == text }
        let name = Array(topic.utf8)
        let first = Array(parts[0].utf8)
        let last = Array(parts[parts.count - 1].utf8)
        guard name.count >= first.count + last.count, name.starts(with: first),
            name.suffix(last.count).elementsEqual(last)
        else { return false }
        var position = first.count
        let end = name.count - last.count
        for part in parts.dropFirst().dropLast() where !part.isEmpty {
            let literal = Array(part.utf8)
            var found = false
            while position + literal.count <= end {
                if name[position..<position + literal.count].elementsEqual(literal) {
                    position += literal.count
                    found = true
                    break
                }
                position += 1
            }
            if !found { return false }
        }
        return true
    }
}

/// The grants of one credential: per action, the topic patterns it covers.
public struct Permissions: Sendable, Hashable, Codable {
    public var publish: [TopicPattern]
    public var subscribe: [TopicPattern]
    public var admin: [TopicPattern]

    public init(publish: [TopicPattern] = [], subscribe: [TopicPattern] = [], admin: [TopicPattern] = []) {
        self.publish = publish
        self.subscribe = subscribe
        self.admin = admin
    }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        publish = try container.decodeIfPresent([TopicPattern].self, forKey: .publish) ?? []
        subscribe = try container.decodeIfPresent([TopicPattern].self, forKey: .subscribe) ?? []
        admin = try container.decodeIfPresent([TopicPattern].self, forKey: .admin) ?? []
    }

    /// Every action on every topic.
    public static let all = Permissions(
        publish: [TopicPattern("*")], subscribe: [TopicPattern("*")], admin: [TopicPattern("*")])

    public func patterns(for action: Action) -> [TopicPattern] {
        switch action {
        case .publish: publish
        case .subscribe: subscribe
        case .admin: admin
        }
    }

    public func allows(_ action: Action, on topic: String) -> Bool {
        patterns(for: action).contains { $0.matches(topic) }
    }
}

/// Who is calling, once authenticated.
public struct Principal: Sendable, Hashable {
    /// The token's name (static tokens) or the JWT's `sub`.
    public var name: String
    public var permissions: Permissions

    public init(name: String, permissions: Permissions) {
        self.name = name
        self.permissions = permissions
    }

    /// The caller when authentication is off: everything is allowed.
    public static let anonymous = Principal(name: "anonymous", permissions: .all)
}

/// Why a request was refused.
public struct AuthError: Error, Hashable, Sendable, CustomStringConvertible {
    public enum Code: String, Sendable, Hashable {
        /// No credential, or one that is malformed, forged, expired or not yet valid (HTTP 401).
        case unauthenticated
        /// A valid credential without the permission (HTTP 403).
        case forbidden
    }

    public let code: Code
    public let message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "AuthError.\(code.rawValue): \(message)" }
}
