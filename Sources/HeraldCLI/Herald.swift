import ArgumentParser
import Herald

@main
struct HeraldCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "herald",
        abstract: "Herald: event-driven microservices for Swift.",
        subcommands: [
            ServeCommand.self, PublishCommand.self, TailCommand.self, TopicsCommand.self, GroupsCommand.self,
            DeadLettersCommand.self, ServiceCommand.self, DemoCommand.self, BenchCommand.self, RelayCommand.self,
        ]
    )
}
