import ArgumentParser
import Herald

@main
struct HeraldCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "herald",
        abstract: "Herald: event-driven microservices for Swift.",
        subcommands: [DemoCommand.self, BenchCommand.self]
    )
}
