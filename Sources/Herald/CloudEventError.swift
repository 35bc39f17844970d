/// A problem with a CloudEvent: malformed input, a missing or mistyped attribute, a bad extension name,
/// data that cannot be decoded, or an unknown type. The message names the problem.
public struct CloudEventError: Error, Hashable, Sendable, CustomStringConvertible {
    /// What kind of problem; a struct so that new kinds can be added without breaking callers.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        let name: String
        public var description: String { name }
        public static let malformedJSON = Code(name: "malformedJSON")
        public static let missingAttribute = Code(name: "missingAttribute")
        public static let invalidAttributeType = Code(name: "invalidAttributeType")
        public static let invalidAttributeValue = Code(name: "invalidAttributeValue")
        public static let invalidExtensionName = Code(name: "invalidExtensionName")
        public static let unsupportedSpecVersion = Code(name: "unsupportedSpecVersion")
        public static let invalidData = Code(name: "invalidData")
        public static let unknownEventType = Code(name: "unknownEventType")
        public static let typeMismatch = Code(name: "typeMismatch")
    }

    public let code: Code
    /// The attribute the problem is about, when there is one.
    public let attribute: String?
    public let message: String

    public init(_ code: Code, attribute: String? = nil, _ message: String) {
        self.code = code
        self.attribute = attribute
        self.message = message
    }

    public var description: String { "CloudEventError.\(code): \(message)" }
}
